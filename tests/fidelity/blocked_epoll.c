/* Frozen in epoll_wait(2) (which answers EINTR after any stop, as the kernel documents): the
 * epoll set survives and reports the driver's byte on the FIFO with its data. */
#include "fidelity.h"
#include <sys/epoll.h>

int main(void) {
    fid_init();
    open_ctl();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0xfeedface12345678ull};
    epoll_ctl(ep, EPOLL_CTL_ADD, ctl_fd, &ev);
    printf("READY\n");
    struct epoll_event out[4];
    int n, eintr = 0;
    for (int i = 0; i < 100; i++) {
        n = epoll_wait(ep, out, 4, 20000);
        if (n == -1 && errno == EINTR) { eintr++; continue; }
        break;
    }
    CHECK(n == 1, "epoll_wait returned %d (%s)", n, n < 0 ? strerror(errno) : "");
    if (n == 1) CHECK(out[0].data.u64 == 0xfeedface12345678ull && (out[0].events & EPOLLIN), "event data %llx", (unsigned long long)out[0].data.u64);
    CHECK(go_received(), "no byte");
    return finish();
}
