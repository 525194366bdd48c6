/* Lazy restore: a process that runs while its pre-copied pages are still being copied in
 * (the test holds the background copy, so every first touch below is a fault served by the
 * restorer). After go it reads into an untouched page from a pipe (a fault taken inside the
 * kernel), forks (from a thread made after the restore) a child that checks pages it never
 * touched, moves a range with mremap, discards one with MADV_DONTNEED (it must read as zeros,
 * not as the old data) and unmaps one; then it checks every page. */
#include "fidelity.h"
#include <sys/mman.h>
#include <sys/wait.h>
#include <pthread.h>

#define PAGES 8192 /* 32 MiB */
#define PG 4096UL

static unsigned char *buf;

static uint64_t word(uint64_t idx) { return idx * 2654435761u + 7; }

static void fill(unsigned char *pg, uint64_t idx) {
    uint64_t *w = (uint64_t *)pg;
    w[0] = idx;
    w[511] = word(idx);
}

static int page_ok(const unsigned char *pg, uint64_t idx) {
    const uint64_t *w = (const uint64_t *)pg;
    return w[0] == idx && w[511] == word(idx);
}

static int zeros(const unsigned char *pg) {
    for (size_t i = 0; i < PG; i++)
        if (pg[i]) return 0;
    return 1;
}

static int gate[2];

/* The child: waits at the gate, then checks the first half of the pages. */
static void *fork_child(void *out) {
    pid_t c = fork();
    if (c == 0) {
        char ch;
        if (read(gate[0], &ch, 1) != 1) _exit(3);
        int bad = 0;
        for (uint64_t i = 0; i < PAGES / 2; i++)
            if (!page_ok(buf + i * PG, i)) bad++;
        _exit(bad ? 1 : 0);
    }
    *(pid_t *)out = c;
    return NULL;
}

int main(void) {
    fid_init();
    buf = mmap(NULL, PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) { printf("FAIL mmap\n"); return 2; }
    for (uint64_t i = 0; i < PAGES; i++) fill(buf + i * PG, i);
    ready();
    wait_go();

    /* 1. A read() into a page nobody touched since the restore. */
    int p[2];
    CHECK(pipe(p) == 0, "pipe");
    CHECK(write(p[1], "lazy-restore-ok!", 16) == 16, "write pipe");
    unsigned char *into = buf + 100 * PG + 64;
    CHECK(read(p[0], into, 16) == 16, "read into an untouched page: %s", strerror(errno));
    CHECK(memcmp(into, "lazy-restore-ok!", 16) == 0, "read data");
    CHECK(page_ok(buf + 100 * PG, 100), "the rest of the page read into");

    /* 2. A child forked before most pages are in — by a thread made after the restore — checks
     * the first half (once its parent saw that it is guarded too: traced by the restorer, like
     * the parent). */
    CHECK(pipe(gate) == 0, "pipe");
    pthread_t forker;
    pid_t child = -1;
    CHECK(pthread_create(&forker, NULL, fork_child, &child) == 0, "pthread_create");
    pthread_join(forker, NULL);
    CHECK(child > 0, "fork");
    char path[64], status[4096] = {0};
    snprintf(path, sizeof path, "/proc/%d/status", (int)child);
    FILE *f = fopen(path, "r");
    if (f) { size_t n = fread(status, 1, sizeof status - 1, f); status[n] = 0; fclose(f); }
    char *tp = strstr(status, "TracerPid:");
    printf("child tracer %d\n", tp ? atoi(tp + 10) : -1);
    CHECK(write(gate[1], "g", 1) == 1, "gate");

    /* 3. Pages 1024..2047 moved elsewhere. */
    void *hole = mmap(NULL, 1024 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *moved = mremap(buf + 1024 * PG, 1024 * PG, 1024 * PG, MREMAP_MAYMOVE | MREMAP_FIXED, hole);
    CHECK(moved != MAP_FAILED, "mremap: %s", strerror(errno));

    /* 4. Pages 3000..3099 discarded: zeros from now on. 5. Pages 4000..4099 unmapped. */
    CHECK(madvise(buf + 3000 * PG, 100 * PG, MADV_DONTNEED) == 0, "madvise");
    CHECK(munmap(buf + 4000 * PG, 100 * PG) == 0, "munmap");

    int bad = 0, badz = 0, badm = 0;
    for (uint64_t i = 0; i < PAGES; i++) {
        if ((i >= 1024 && i < 2048) || (i >= 4000 && i < 4100)) continue;
        if (i >= 3000 && i < 3100) { if (!zeros(buf + i * PG)) badz++; continue; }
        if (i == 100) continue;
        if (!page_ok(buf + i * PG, i)) bad++;
    }
    if (moved != MAP_FAILED)
        for (uint64_t i = 0; i < 1024; i++)
            if (!page_ok(moved + i * PG, 1024 + i)) badm++;
    CHECK(bad == 0, "%d pages differ", bad);
    CHECK(badz == 0, "%d discarded pages are not zero", badz);
    CHECK(badm == 0, "%d moved pages differ", badm);
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0, "the child saw wrong pages (status %#x)", st);
    return finish();
}
