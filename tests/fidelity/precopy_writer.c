/* Pre-copy: memory that keeps changing while it is copied. 64 MiB of pages, each starting with
 * the generation last written into it (and a per-page fill derived from it); a table of the
 * expected generations lives in memory too, so any page restored from an older copy than the
 * table is caught. Meanwhile mappings are created and unmapped (a ring of 1 MiB regions),
 * pages are discarded with MADV_DONTNEED and read back as zero pages, and regions are moved
 * with mremap (which drops a userfaultfd registration). After go: every page and every live region must match. */
#include "fidelity.h"
#include <sys/mman.h>

#define PAGES (16384) /* 64 MiB */
#define PG 4096
#define RING 4
#define REGION (1 << 20)

static uint64_t *expected;
static unsigned char *buf;
static struct { unsigned char *p; uint64_t v; } ring[RING];

static void fill_page(unsigned char *pg, uint64_t gen, uint64_t idx) {
    uint64_t *w = (uint64_t *)pg;
    w[0] = gen;
    w[1] = idx;
    w[511] = gen * 2654435761u + idx;
}

static int page_ok(unsigned char *pg, uint64_t gen, uint64_t idx) {
    uint64_t *w = (uint64_t *)pg;
    if (gen == 0) { /* discarded: reads as zeros */
        for (int i = 0; i < 512; i++) if (w[i]) return 0;
        return 1;
    }
    return w[0] == gen && w[1] == idx && w[511] == gen * 2654435761u + idx;
}

static void new_region(int slot, uint64_t v) {
    if (ring[slot].p) munmap(ring[slot].p, REGION);
    ring[slot].p = mmap(NULL, REGION, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ring[slot].p == MAP_FAILED) { printf("FAIL mmap\n"); exit(2); }
    for (int i = 0; i < REGION; i += PG) memset(ring[slot].p + i, (int)(v & 0xff), 64);
    ring[slot].v = v;
}

int main(void) {
    fid_init();
    expected = calloc(PAGES, sizeof *expected);
    buf = mmap(NULL, (size_t)PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!expected || buf == MAP_FAILED) { printf("FAIL alloc\n"); return 2; }
    uint64_t gen = 1;
    for (uint64_t i = 0; i < PAGES; i++) { fill_page(buf + i * PG, gen, i); expected[i] = gen; }
    for (int s = 0; s < RING; s++) new_region(s, 100 + s);
    ready();
    uint64_t x = 88172645463325252ull, step = 0;
    /* Bounded: wait_go's deadline (30 s of 1 ms sleeps). */
    for (long ms = 0; ms < 30000; ms++) {
        if (go_received()) break;
        for (int k = 0; k < 16; k++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            uint64_t p = x % PAGES;
            gen++;
            fill_page(buf + p * PG, gen, p);
            expected[p] = gen;
        }
        step++;
        if (step % 20 == 0) new_region((int)(step / 20 % RING), 100 + step);
        if (step % 50 == 25) { /* move a region: grow it (likely to a new place), shrink back */
            int s = (int)(step / 50 % RING);
            void *q = mremap(ring[s].p, REGION, 2 * REGION, MREMAP_MAYMOVE);
            if (q != MAP_FAILED) ring[s].p = mremap(q, 2 * REGION, REGION, 0);
        }
        if (step % 7 == 0) { /* discard a page, then read it: the shared zero page */
            uint64_t p = (x >> 20) % PAGES;
            madvise(buf + p * PG, PG, MADV_DONTNEED);
            expected[p] = 0;
            volatile unsigned char c = buf[p * PG + 8];
            (void)c;
        }
    }
    int bad = 0;
    for (uint64_t i = 0; i < PAGES; i++)
        if (!page_ok(buf + i * PG, expected[i], i) && bad++ < 5)
            CHECK(0, "page %lu: gen %lu expected %lu", (unsigned long)i, (unsigned long)((uint64_t *)(buf + i * PG))[0], (unsigned long)expected[i]);
    CHECK(bad == 0, "%d of %d pages differ from the table", bad, PAGES);
    for (int s = 0; s < RING; s++)
        for (int i = 0; i < REGION; i += PG)
            if (ring[s].p[i] != (unsigned char)(ring[s].v & 0xff) || ring[s].p[i + 63] != (unsigned char)(ring[s].v & 0xff)) {
                CHECK(0, "region %d (value %lu) differs at %d", s, (unsigned long)ring[s].v, i);
                break;
            }
    printf("steps %lu\n", (unsigned long)step);
    return finish();
}
