/* A pipe each way and an AF_UNIX socket pair between parent and child, each holding unread
 * bytes at the dump; after the restore the bytes are there (an epoll set of the parent's on its
 * two ends says so), new ones go both ways, and a closed write end gives the reader EOF (no
 * stray writer). stdout is one description shared by both:
 * the child's line and the parent's stay whole (one offset). */
#include "fidelity.h"
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }

static int rd(int fd, const char *want) {
    char b[16] = {0};
    size_t n = strlen(want), got = 0;
    while (got < n) {
        ssize_t k = read(fd, b + got, n - got);
        if (k <= 0) return 0;
        got += k;
    }
    return memcmp(b, want, n) == 0;
}

static int queued(int fd) {
    int n = 0;
    ioctl(fd, FIONREAD, &n);
    return n;
}

int main(void) {
    fid_init();
    int p2c[2], c2p[2], sv[2];
    if (pipe(p2c) || pipe(c2p) || socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) { printf("FAIL setup\n"); return 1; }
    signal(SIGUSR1, on_usr1);
    pid_t c = fork();
    if (c == 0) {
        close(p2c[1]); close(c2p[0]); close(sv[0]);
        write(c2p[1], "pipe-c1", 7);
        write(sv[1], "sock-c1", 7);
        for (int i = 0; i < 30000 && !usr1; i++) msleep(1);
        int ok = usr1 && rd(p2c[0], "pipe-p1") && rd(sv[1], "sock-p1");
        ok = ok && rd(p2c[0], "pipe-p2") && rd(sv[1], "sock-p2");
        char x;
        ok = ok && read(p2c[0], &x, 1) == 0; /* the parent closed its write end */
        ok = ok && write(c2p[1], "pipe-c2", 7) == 7 && write(sv[1], "sock-c2", 7) == 7;
        printf("child-%s\n", ok ? "ok" : "bad");
        _exit(ok ? 0 : 1);
    }
    close(p2c[0]); close(c2p[1]); close(sv[1]);
    write(p2c[1], "pipe-p1", 7);
    write(sv[0], "sock-p1", 7);
    for (int i = 0; i < 10000 && (queued(c2p[0]) < 7 || queued(sv[0]) < 7); i++) msleep(1);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 1};
    epoll_ctl(ep, EPOLL_CTL_ADD, c2p[0], &ev);
    ev.data.u64 = 2;
    epoll_ctl(ep, EPOLL_CTL_ADD, sv[0], &ev);
    ready();
    wait_go();
    struct epoll_event got[4];
    int n = epoll_wait(ep, got, 4, 0);
    CHECK(n == 2 && got[0].data.u64 + got[1].data.u64 == 3, "epoll on the pipe and the socket: %d ready", n);
    CHECK(kill(c, SIGUSR1) == 0, "child gone");
    CHECK(rd(c2p[0], "pipe-c1"), "pipe data from the child lost");
    CHECK(rd(sv[0], "sock-c1"), "socket data from the child lost");
    CHECK(write(p2c[1], "pipe-p2", 7) == 7 && write(sv[0], "sock-p2", 7) == 7, "write to the child");
    close(p2c[1]);
    CHECK(rd(c2p[0], "pipe-c2"), "new pipe data from the child");
    CHECK(rd(sv[0], "sock-c2"), "new socket data from the child");
    int st = 0;
    CHECK(waitpid(c, &st, 0) == c, "child not ours");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    char x;
    CHECK(read(c2p[0], &x, 1) == 0, "no EOF from the child's pipe");
    return finish();
}
