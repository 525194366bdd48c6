/* A deleted-but-open file: the dump is refused (naming the fd) and this process runs on. */
#include "fidelity.h"

int main(void) {
    fid_init();
    int fd = open("gone.txt", O_RDWR | O_CREAT, 0600);
    write(fd, "data", 4);
    unlink("gone.txt");
    ready();
    wait_go();
    char b[4];
    CHECK(pread(fd, b, 4, 0) == 4 && memcmp(b, "data", 4) == 0, "file lost");
    return finish();
}
