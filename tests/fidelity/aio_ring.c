/* An AIO context (io_setup) with one completed write not yet reaped: refused at dump, naming
 * the ring and why (requests in flight cannot be seen from outside the kernel); the program
 * runs on and reaps its event. */
#include "fidelity.h"
#include <linux/aio_abi.h>

int main(void) {
    fid_init();
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, 32, &ctx)) { printf("FAIL io_setup: %s\n", strerror(errno)); return 2; }
    int fd = open("data", O_RDWR | O_CREAT | O_TRUNC, 0600);
    static char buf[64] = "aio";
    struct iocb cb = {0};
    cb.aio_fildes = fd;
    cb.aio_lio_opcode = IOCB_CMD_PWRITE;
    cb.aio_buf = (unsigned long)buf;
    cb.aio_nbytes = sizeof buf;
    struct iocb *list[1] = {&cb};
    if (syscall(SYS_io_submit, ctx, 1, list) != 1) { printf("FAIL io_submit: %s\n", strerror(errno)); return 2; }
    ready();
    wait_go();
    struct io_event ev;
    struct timespec ts = {5, 0};
    long n = syscall(SYS_io_getevents, ctx, 1, 1, &ev, &ts);
    CHECK(n == 1 && ev.res == sizeof buf, "io_getevents %ld res %lld", n, (long long)ev.res);
    return finish();
}
