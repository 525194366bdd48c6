/* A deleted file whose directory was removed too: it could not be made again in its
 * directory, so the dump is refused naming both; the process runs on. */
#include "fidelity.h"
#include <sys/stat.h>

int main(void) {
    fid_init();
    open_ctl();
    mkdir("d", 0700);
    int fd = open("d/f", O_RDWR | O_CREAT, 0600);
    write(fd, "x", 1);
    unlink("d/f");
    rmdir("d");
    ready();
    wait_go();
    char c;
    CHECK(pread(fd, &c, 1, 0) == 1 && c == 'x', "file lost");
    return finish();
}
