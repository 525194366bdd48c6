/* An io_uring instance: the dump is refused naming the fd; the process runs on. */
#include "fidelity.h"
#include <linux/io_uring.h>

int main(void) {
    fid_init();
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int fd = syscall(SYS_io_uring_setup, 4, &p);
    if (fd < 0) { printf("FAIL io_uring_setup: %s\n", strerror(errno)); return 1; }
    ready();
    wait_go();
    CHECK(fcntl(fd, F_GETFD) != -1, "ring gone");
    return finish();
}
