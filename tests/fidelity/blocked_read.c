/* Frozen while blocked in read(2) on a FIFO: the read restarts after restore and gets the byte
 * the driver writes then. */
#include "fidelity.h"

int main(void) {
    fid_init();
    int fd = open("ctl", O_RDWR); /* blocking */
    printf("READY\n");
    char c = 0;
    ssize_t n = read(fd, &c, 1);
    CHECK(n == 1 && c == 'g', "read returned %zd (%s) c=%c", n, n < 0 ? strerror(errno) : "", c);
    return finish();
}
