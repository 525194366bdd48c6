/* An epoll set with several kinds of fds, events (EPOLLET included) and user data. */
#include "fidelity.h"
#include <sys/epoll.h>
#include <sys/eventfd.h>

int main(void) {
    fid_init();
    int ep = epoll_create1(0);
    int e = eventfd(1, EFD_NONBLOCK);
    int p[2];
    pipe(p);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = 111};
    epoll_ctl(ep, EPOLL_CTL_ADD, e, &ev);
    ev.events = EPOLLIN; ev.data.u64 = 222;
    epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev);
    ev.events = EPOLLOUT; ev.data.u64 = 333;
    epoll_ctl(ep, EPOLL_CTL_ADD, p[1], &ev);
    ready();
    wait_go();
    struct epoll_event out[8];
    int n = epoll_wait(ep, out, 8, 1000);
    int seen111 = 0, seen222 = 0, seen333 = 0;
    for (int i = 0; i < n; i++) {
        if (out[i].data.u64 == 111) seen111++;
        if (out[i].data.u64 == 222) seen222++;
        if (out[i].data.u64 == 333) seen333++;
    }
    CHECK(n == 2 && seen111 == 1 && seen333 == 1 && !seen222, "first wait: n=%d %d %d %d", n, seen111, seen222, seen333);
    write(p[1], "x", 1);
    n = epoll_wait(ep, out, 8, 1000);
    seen111 = seen222 = 0;
    for (int i = 0; i < n; i++) { if (out[i].data.u64 == 111) seen111++; if (out[i].data.u64 == 222) seen222++; }
    CHECK(seen222 == 1 && seen111 == 0, "edge-triggered eventfd reported again or pipe missing (%d %d)", seen111, seen222);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, p[0], NULL) == 0, "DEL by fd number");
    return finish();
}
