/* A private file mapping with some pages changed: changed pages come from the image, the
 * others still from the file. Also a shared read-only file mapping. */
#include "fidelity.h"
#include <sys/mman.h>

int main(void) {
    fid_init();
    int fd = open("data.bin", O_RDWR | O_CREAT | O_TRUNC, 0600);
    char page[4096];
    for (int p = 0; p < 16; p++) { memset(page, 'a' + p, sizeof page); write(fd, page, sizeof page); }
    char *m = mmap(NULL, 16 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    char *s = mmap(NULL, 16 * 4096, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    volatile char sum = 0;
    for (int p = 0; p < 16; p++) sum += m[p * 4096]; /* read all: file pages */
    for (int p = 0; p < 16; p += 3) memset(m + p * 4096, 'Z', 100); /* COW some */
    ready();
    wait_go();
    for (int p = 0; p < 16; p++) {
        char want0 = (p % 3 == 0) ? 'Z' : 'a' + p;
        CHECK(m[p * 4096] == want0, "page %d byte0 %c want %c", p, m[p * 4096], want0);
        CHECK(m[p * 4096 + 200] == 'a' + p, "page %d byte200", p);
        CHECK(s[p * 4096] == 'a' + p, "shared page %d", p);
    }
    m[5] = 'q';
    CHECK(m[5] == 'q', "write after restore");
    return finish();
}
