/* An epoll set that holds one file through several fds: an eventfd registered through two fds
 * (dup), one registered through an fd that was closed since (its dup keeps the file: the
 * registration stays under the old number), and one fd number registered twice for two
 * different files (dup2 over a registered fd whose file stays open elsewhere). Every
 * registration reports its events after restore; the closed number stays closed. */
#include "fidelity.h"
#include <sys/epoll.h>
#include <sys/eventfd.h>

static void add(int ep, int fd, uint64_t data) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = data};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev)) { printf("FAIL setup: add %d: %s\n", fd, strerror(errno)); exit(2); }
}

int main(void) {
    fid_init();
    open_ctl(); /* now: it must not take the number closed below */
    int ep = epoll_create1(0);
    int a = eventfd(1, EFD_NONBLOCK), b = dup(a);
    add(ep, a, 1);
    add(ep, b, 2);
    int c = eventfd(1, EFD_NONBLOCK);
    add(ep, c, 3);
    int d = dup(c);
    int x = eventfd(1, EFD_NONBLOCK), y = eventfd(1, EFD_NONBLOCK);
    add(ep, x, 4);
    int z = dup(x);
    dup2(y, x); /* fd x now is y's file; x's old file stays open as z and registered under x */
    add(ep, x, 5);
    close(y);
    close(c); /* last: no later fd takes its number */
    ready();
    wait_go();
    struct epoll_event out[16];
    int n = epoll_wait(ep, out, 16, 1000), seen[6] = {0};
    for (int i = 0; i < n; i++)
        if (out[i].data.u64 < 6) seen[out[i].data.u64]++;
    for (int i = 1; i < 6; i++) CHECK(seen[i] == 1, "registration %d reported %d times (n=%d)", i, seen[i], n);
    CHECK(fcntl(c, F_GETFD) == -1 && errno == EBADF, "closed fd %d came back", c);
    uint64_t v;
    CHECK(read(d, &v, 8) == 8 && v == 1, "the dup of the closed fd");
    CHECK(read(z, &v, 8) == 8 && v == 1 && read(x, &v, 8) == 8 && v == 1, "files of fd x and z");
    /* Drained: the registrations of those files go quiet, the others stay. */
    n = epoll_wait(ep, out, 16, 0);
    memset(seen, 0, sizeof seen);
    for (int i = 0; i < n; i++)
        if (out[i].data.u64 < 6) seen[out[i].data.u64]++;
    CHECK(seen[1] && seen[2] && !seen[3] && !seen[4] && !seen[5], "after draining: %d %d %d %d %d", seen[1], seen[2], seen[3], seen[4], seen[5]);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, b, NULL) == 0, "DEL by fd number");
    return finish();
}
