/* A deleted FIFO whose directory was removed too: it could not be made again in its directory,
 * so the dump is refused naming both; the process runs on. */
#include "fidelity.h"
#include <sys/stat.h>

int main(void) {
    fid_init();
    open_ctl();
    mkdir("d", 0700);
    mkfifo("d/p", 0600);
    int fd = open("d/p", O_RDWR | O_NONBLOCK);
    write(fd, "x", 1);
    unlink("d/p");
    rmdir("d");
    ready();
    wait_go();
    char c;
    CHECK(read(fd, &c, 1) == 1 && c == 'x', "FIFO data lost");
    return finish();
}
