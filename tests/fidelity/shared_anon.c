/* MAP_SHARED|MAP_ANONYMOUS memory keeps its contents and stays writable. */
#include "fidelity.h"
#include <sys/mman.h>

int main(void) {
    fid_init();
    size_t len = 4 << 20;
    uint32_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < len / 4; i += 97) m[i] = (uint32_t)(i * 31 + 7);
    ready();
    wait_go();
    for (size_t i = 0; i < len / 4; i += 97) if (m[i] != (uint32_t)(i * 31 + 7)) { CHECK(0, "word %zu", i); break; }
    m[1] = 42;
    CHECK(m[1] == 42, "write");
    return finish();
}
