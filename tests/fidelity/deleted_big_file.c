/* A deleted file with more data than the image carries (17 MiB): the dump is refused naming
 * the file and its size; the process runs on. */
#include "fidelity.h"

int main(void) {
    fid_init();
    int fd = open("big.bin", O_RDWR | O_CREAT, 0600);
    static char chunk[1 << 20];
    memset(chunk, 'b', sizeof chunk);
    for (int i = 0; i < 17; i++) write(fd, chunk, sizeof chunk);
    unlink("big.bin");
    ready();
    wait_go();
    char c;
    CHECK(pread(fd, &c, 1, 5) == 1 && c == 'b', "file lost");
    return finish();
}
