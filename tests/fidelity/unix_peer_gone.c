/* Connected AF_UNIX stream sockets whose peer has closed (every JVM with NIO holds one): one
 * with unread bytes, one drained, one non-blocking. After restore each reads what was queued,
 * then end of file; writing fails with EPIPE; it is still a stream socket. */
#include "fidelity.h"
#include <poll.h>
#include <sys/socket.h>

static int gone(const char *data, int nonblock) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0, sv)) { printf("FAIL socketpair\n"); exit(2); }
    if (data && write(sv[1], data, strlen(data)) != (ssize_t)strlen(data)) { printf("FAIL write\n"); exit(2); }
    close(sv[1]);
    return sv[0];
}

static void check_gone(int fd, const char *want, int nonblock) {
    char buf[64] = {0};
    size_t n = want ? strlen(want) : 0;
    if (n) CHECK(read(fd, buf, sizeof buf) == (ssize_t)n && memcmp(buf, want, n) == 0, "fd %d: unread data lost (%s)", fd, buf);
    CHECK(read(fd, buf, sizeof buf) == 0, "fd %d: no end of file after the data", fd);
    errno = 0;
    CHECK(write(fd, "x", 1) == -1 && errno == EPIPE, "fd %d: write to a closed peer gave errno %d", fd, errno);
    int type = 0;
    socklen_t len = sizeof type;
    CHECK(getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM, "fd %d: type %d", fd, type);
    int fl = fcntl(fd, F_GETFL);
    CHECK(!!(fl & O_NONBLOCK) == nonblock, "fd %d: O_NONBLOCK %d", fd, !!(fl & O_NONBLOCK));
    struct pollfd p = {.fd = fd, .events = POLLIN};
    CHECK(poll(&p, 1, 0) == 1 && (p.revents & POLLHUP), "fd %d: poll revents %#x", fd, p.revents);
}

int main(void) {
    fid_init();
    signal(SIGPIPE, SIG_IGN);
    int a = gone("queued bytes", 0);
    int b = gone(NULL, 0);
    int c = gone("nb", 1);
    ready();
    wait_go();
    check_gone(a, "queued bytes", 0);
    check_gone(b, NULL, 0);
    check_gone(c, "nb", 1);
    return finish();
}
