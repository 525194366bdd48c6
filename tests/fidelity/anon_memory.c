/* Private anonymous memory: heap (small and large malloc), stack, a 64 MiB mmap with holes that
 * were never touched; after restore the heap keeps growing (malloc and sbrk). */
#include "fidelity.h"
#include <sys/mman.h>

static uint64_t pat(uint64_t i) { return i * 0x9E3779B97F4A7C15ull ^ 0xdeadbeef; }

int main(void) {
    fid_init();
    char *small[100];
    for (int i = 0; i < 100; i++) { small[i] = malloc(100 + i); memset(small[i], i, 100 + i); }
    size_t big = 64 << 20;
    uint64_t *m = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < big / 8; i += 2048) if ((i / 2048) % 3) m[i] = pat(i); /* holes */
    volatile char stackbuf[16384];
    for (int i = 0; i < 16384; i++) stackbuf[i] = (char)(i * 7);
    char *heap_big = malloc(8 << 20); memset(heap_big, 0x5a, 8 << 20);
    void *brk0 = sbrk(0);
    ready();
    wait_go();
    for (int i = 0; i < 100; i++) for (int j = 0; j < 100 + i; j++) CHECK(small[i][j] == (char)i, "small %d", i);
    for (size_t i = 0; i < big / 8; i += 2048) CHECK(m[i] == ((i / 2048) % 3 ? pat(i) : 0), "mmap word %zu", i);
    for (int i = 0; i < 16384; i++) if (stackbuf[i] != (char)(i * 7)) { CHECK(0, "stack %d", i); break; }
    for (int i = 0; i < (8 << 20); i += 4096) if (heap_big[i] != 0x5a) { CHECK(0, "heap_big %d", i); break; }
    CHECK(sbrk(0) == brk0, "brk moved %p %p", sbrk(0), brk0);
    char *more = sbrk(1 << 20);
    CHECK(more != (void *)-1, "sbrk failed: %s", strerror(errno));
    if (more != (void *)-1) { memset(more, 1, 1 << 20); CHECK(more == brk0, "sbrk returned %p not %p", more, brk0); }
    for (int i = 0; i < 1000; i++) { char *p = malloc(1000 + i); CHECK(p != NULL, "malloc"); memset(p, 3, 1000 + i); }
    char *huge = malloc(100 << 20);
    CHECK(huge != NULL, "malloc 100M");
    if (huge) memset(huge, 9, 100 << 20);
    return finish();
}
