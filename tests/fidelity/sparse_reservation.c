/* A 32 GiB PROT_NONE reservation (as JVMs, Go and sanitizers make) with 1 MiB made usable and
 * written in its middle: only that MiB is stored, the reservation comes back whole. */
#include "fidelity.h"
#include <sys/mman.h>

int main(void) {
    fid_init();
    size_t len = 32ULL << 30, mid = 16ULL << 30;
    char *r = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) { printf("FAIL mmap: %s\n", strerror(errno)); return 1; }
    mprotect(r + mid, 1 << 20, PROT_READ | PROT_WRITE);
    memset(r + mid, 7, 1 << 20);
    ready();
    wait_go();
    CHECK(r[mid] == 7 && r[mid + (1 << 20) - 1] == 7, "data lost");
    CHECK(mprotect(r, 4096, PROT_READ) == 0 && r[0] == 0, "reservation start not mapped");
    CHECK(mprotect(r + len - 4096, 4096, PROT_READ) == 0 && r[len - 1] == 0, "reservation end not mapped");
    return finish();
}
