/* Server half of the socket-semantics check (client: sockcheck_client.c).
 *
 *   sockcheck_server PORT [NPROBES]
 *
 * Listens on 0.0.0.0:PORT, prints "READY", discards NPROBES connections (the
 * test's net_probe, which connects and closes), then serves exactly three
 * connections, in this order:
 *   A  accept4(SOCK_NONBLOCK|SOCK_CLOEXEC): flags checked with fcntl; epoll
 *      readiness; readv of the client's writev'd request; getpeername /
 *      getsockname / accept's address reported back with sendmsg; then reads
 *      the half-closed rest to EOF and answers "GOT <n>\n" after the EOF.
 *   B  accept(): TCP and SOL_SOCKET options; echoes with recv/send until EOF.
 *   C  accept(): writes "bye", shutdown(SHUT_WR) (the client sees EOF), then
 *      still reads the client's "thanks" until EOF.
 * Prints "ok <check>" per check, "FAIL <check>: <detail>" and exits 1 on the
 * first failure, "SERVER PASS" at the end.
 * Before A, the listener is made non-blocking: accept must say EAGAIN and
 * poll(POLLIN) must wake when A arrives. After C:
 *   D  accept(): the client bound its socket before connecting; echo 4 bytes.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#include "sockcheck.h"

static void fail(const char *check, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL %s: ", check);
    vprintf(fmt, ap);
    printf(" (errno %d %s)\n", errno, strerror(errno));
    va_end(ap);
    fflush(stdout);
    exit(1);
}


/* Waits for `events` on fd with epoll (bounded). */
static void epoll_wait_for(int ep, int fd, uint32_t events, const char *check) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) != 0) fail(check, "epoll_ctl MOD");
    struct epoll_event got;
    int n = epoll_wait(ep, &got, 1, 10000);
    if (n != 1) fail(check, "epoll_wait returned %d after 10 s", n);
    if (got.data.fd != fd || !(got.events & events))
        fail(check, "epoll_wait events 0x%x", got.events);
}

/* Reads exactly `len` bytes from a non-blocking fd with readv into two parts, waiting with epoll. */
static void readv_exact(int ep, int fd, char *a, size_t alen, char *b, size_t blen) {
    size_t got = 0, total = alen + blen;
    while (got < total) {
        struct iovec iov[2];
        int cnt = 0;
        if (got < alen) {
            iov[cnt].iov_base = a + got;
            iov[cnt++].iov_len = alen - got;
            iov[cnt].iov_base = b;
            iov[cnt++].iov_len = blen;
        } else {
            iov[cnt].iov_base = b + (got - alen);
            iov[cnt++].iov_len = total - got;
        }
        ssize_t n = readv(fd, iov, cnt);
        if (n > 0) {
            got += n;
        } else if (n == 0) {
            fail("A.readv", "EOF after %zu of %zu bytes", got, total);
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            epoll_wait_for(ep, fd, EPOLLIN, "A.epoll-more");
        } else if (errno != EINTR) {
            fail("A.readv", "readv");
        }
    }
}

static void set_blocking(int fd) {
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: sockcheck_server PORT [NPROBES]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    int port = atoi(argv[1]);
    char s1[64], s2[64], s3[64];

    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (l < 0) fail("socket", "socket(AF_INET)");
    int one = 1;
    if (setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
        fail("listener.SO_REUSEADDR", "setsockopt");
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(l, (struct sockaddr *)&sa, sizeof sa) != 0) fail("bind", "bind 0.0.0.0:%d", port);
    if (listen(l, 16) != 0) fail("listen", "listen");
    struct sockaddr_in la;
    socklen_t len = sizeof la;
    memset(&la, 0, sizeof la);
    if (getsockname(l, (struct sockaddr *)&la, &len) != 0) fail("listener.getsockname", "getsockname");
    if (la.sin_family != AF_INET || ntohs(la.sin_port) != port)
        fail("listener.getsockname", "family %d port %u, want AF_INET port %d", la.sin_family,
             ntohs(la.sin_port), port);
    ok("listener.getsockname");
    printf("READY\n");
    fflush(stdout);
    for (int probes = argc == 3 ? atoi(argv[2]) : 0; probes > 0; probes--) {
        int p = accept(l, NULL, NULL);
        if (p < 0) fail("probe.accept", "accept");
        struct timeval tv = {.tv_sec = 10};
        setsockopt(p, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char c;
        ssize_t r = read(p, &c, 1);
        if (r != 0) fail("probe.eof", "the probe connection gave %zd, want EOF", r);
        close(p);
        ok("probe");
    }

    /* ---- non-blocking listener ---- */
    int lfl = fcntl(l, F_GETFL);
    fcntl(l, F_SETFL, lfl | O_NONBLOCK);
    errno = 0;
    int early = accept(l, NULL, NULL);
    if (early >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
        fail("listener.nonblock-accept", "accept on an empty non-blocking listener returned %d", early);
    ok("listener.nonblock-accept-EAGAIN");
    struct pollfd lp = {.fd = l, .events = POLLIN};
    if (poll(&lp, 1, 20000) != 1 || !(lp.revents & POLLIN)) fail("listener.poll-in", "no POLLIN in 20 s");
    ok("listener.poll-in");
    fcntl(l, F_SETFL, lfl);

    /* ---- A ---- */
    struct sockaddr_in from;
    memset(&from, 0, sizeof from);
    len = sizeof from;
    int a = accept4(l, (struct sockaddr *)&from, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (a < 0) fail("A.accept4", "accept4");
    if (!(fcntl(a, F_GETFL) & O_NONBLOCK)) fail("A.accept4-nonblock", "O_NONBLOCK not set");
    if (!(fcntl(a, F_GETFD) & FD_CLOEXEC)) fail("A.accept4-cloexec", "FD_CLOEXEC not set");
    ok("A.accept4-flags");
    if (from.sin_family != AF_INET || len != sizeof(struct sockaddr_in))
        fail("A.accept-addr", "family %d len %u", from.sin_family, len);
    if (!is_virtual(&from)) fail("A.accept-addr", "peer %s is not in 127.77.0.0/16", fmt_addr(&from, s1, 64));
    ok("A.accept-addr");
    struct sockaddr_in peer, local;
    memset(&peer, 0, sizeof peer);
    memset(&local, 0, sizeof local);
    len = sizeof peer;
    if (getpeername(a, (struct sockaddr *)&peer, &len) != 0) fail("A.getpeername", "getpeername");
    if (peer.sin_family != AF_INET || peer.sin_addr.s_addr != from.sin_addr.s_addr ||
        peer.sin_port != from.sin_port)
        fail("A.getpeername", "%s differs from accept's %s", fmt_addr(&peer, s1, 64), fmt_addr(&from, s2, 64));
    ok("A.getpeername");
    len = sizeof local;
    if (getsockname(a, (struct sockaddr *)&local, &len) != 0) fail("A.getsockname", "getsockname");
    if (local.sin_family != AF_INET || ntohs(local.sin_port) != port || !is_virtual(&local))
        fail("A.getsockname", "%s (family %d), want the endpoint's 127.77.x.x:%d", fmt_addr(&local, s1, 64),
             local.sin_family, port);
    ok("A.getsockname");
    /* A read on the empty non-blocking socket says EAGAIN. */
    char tmp[8];
    ssize_t r = read(a, tmp, sizeof tmp);
    if (!(r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))) {
        /* The client may already have written; then it is data, which is fine. */
        if (r <= 0) fail("A.nonblock-read", "read returned %zd", r);
        fail("A.nonblock-read", "client wrote before the server asked (protocol)");
    }
    ok("A.nonblock-read-EAGAIN");
    /* Ask for the request: the client writes only after this byte, so epoll must wait. */
    write_all(a, "G", 1, "A.go");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = a};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, a, &ev) != 0) fail("A.epoll_ctl", "ADD");
    epoll_wait_for(ep, a, EPOLLIN, "A.epoll-in");
    ok("A.epoll-in");
    char head[4], body[10004];
    readv_exact(ep, a, head, 4, body, sizeof body);
    if (memcmp(head, "REQ1", 4) != 0) fail("A.readv", "header %.4s", head);
    for (int i = 0; i < 10000; i++)
        if (body[i] != (char)('a' + i % 26)) fail("A.readv", "body byte %d", i);
    if (memcmp(body + 10000, "END!", 4) != 0) fail("A.readv", "trailer %.4s", body + 10000);
    ok("A.readv");
    char report[64];
    memset(report, ' ', sizeof report);
    int rl = snprintf(report, sizeof report, "peer=%s local=%s", fmt_addr(&peer, s1, 64), fmt_addr(&local, s2, 64));
    report[rl] = ' ';
    report[63] = '\n';
    struct iovec out[2] = {{.iov_base = "REP1", .iov_len = 4}, {.iov_base = report, .iov_len = 64}};
    struct msghdr mh = {.msg_iov = out, .msg_iovlen = 2};
    set_blocking(a);
    ssize_t w = sendmsg(a, &mh, MSG_NOSIGNAL);
    if (w != 68) fail("A.sendmsg", "sendmsg returned %zd", w);
    ok("A.sendmsg");
    /* Half-close: read to EOF, then answer. */
    size_t rest = 0;
    for (;;) {
        char buf[4096];
        ssize_t n = read(a, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail("A.read-to-eof", "read");
        if (n == 0) break;
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] != "HALF"[(rest + i) % 4]) fail("A.read-to-eof", "byte %zu", rest + i);
        rest += n;
    }
    if (rest != 4000) fail("A.read-to-eof", "got %zu bytes before EOF, want 4000", rest);
    ok("A.half-close-eof");
    char msg[32];
    int ml = snprintf(msg, sizeof msg, "GOT %zu\n", rest);
    write_all(a, msg, ml, "A.reply-after-eof");
    ok("A.reply-after-eof");
    close(a);
    close(ep);

    /* ---- B ---- */
    int b = accept(l, NULL, NULL);
    if (b < 0) fail("B.accept", "accept");
    if (fcntl(b, F_GETFL) & O_NONBLOCK) fail("B.accept-blocking", "plain accept gave O_NONBLOCK");
    if (fcntl(b, F_GETFD) & FD_CLOEXEC) fail("B.accept-blocking", "plain accept gave FD_CLOEXEC");
    struct {
        int level, name, value;
        const char *what;
    } opts[] = {
        {IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY"},   {SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE"},
        {IPPROTO_TCP, TCP_KEEPIDLE, 300, "TCP_KEEPIDLE"}, {IPPROTO_TCP, TCP_KEEPINTVL, 100, "TCP_KEEPINTVL"},
        {IPPROTO_TCP, TCP_KEEPCNT, 3, "TCP_KEEPCNT"},     {SOL_SOCKET, SO_SNDBUF, 262144, "SO_SNDBUF"},
        {SOL_SOCKET, SO_RCVBUF, 262144, "SO_RCVBUF"},
    };
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++) {
        if (setsockopt(b, opts[i].level, opts[i].name, &opts[i].value, sizeof(int)) != 0)
            fail("B.setsockopt", "%s", opts[i].what);
    }
    int soerr = -1;
    len = sizeof soerr;
    if (getsockopt(b, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0 || soerr != 0)
        fail("B.SO_ERROR", "getsockopt SO_ERROR = %d", soerr);
    ok("B.sockopts");
    size_t echoed = 0;
    for (;;) {
        char buf[8192];
        ssize_t n = recv(b, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail("B.recv", "recv");
        if (n == 0) break;
        size_t done = 0;
        while (done < (size_t)n) {
            ssize_t s = send(b, buf + done, n - done, MSG_NOSIGNAL);
            if (s < 0 && errno == EINTR) continue;
            if (s <= 0) fail("B.send", "send");
            done += s;
        }
        echoed += n;
    }
    printf("ok B.echoed %zu\n", echoed);
    close(b);

    /* ---- C ---- */
    int c = accept(l, NULL, NULL);
    if (c < 0) fail("C.accept", "accept");
    write_all(c, "bye", 3, "C.write");
    if (shutdown(c, SHUT_WR) != 0) fail("C.shutdown", "shutdown(SHUT_WR)");
    struct timeval ctv = {.tv_sec = 10};
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &ctv, sizeof ctv);
    char thanks[16];
    size_t tn = 0;
    for (;;) {
        ssize_t n = read(c, thanks + tn, sizeof thanks - tn);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail("C.read-after-own-shutdown", "read after %zu bytes", tn);
        if (n == 0) break;
        tn += n;
        if (tn == sizeof thanks) break;
    }
    if (tn != 6 || memcmp(thanks, "thanks", 6) != 0)
        fail("C.read-after-own-shutdown", "got %zu bytes (%.*s), want \"thanks\"", tn, (int)tn, thanks);
    close(c);
    ok("C.read-after-own-shutdown");

    /* ---- D ---- */
    int d = accept(l, NULL, NULL);
    if (d < 0) fail("D.accept", "accept");
    setsockopt(d, SOL_SOCKET, SO_RCVTIMEO, &ctv, sizeof ctv);
    char dbuf[4];
    size_t dn = 0;
    while (dn < 4) {
        ssize_t n = read(d, dbuf + dn, 4 - dn);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) fail("D.read", "read returned %zd", n);
        dn += n;
    }
    write_all(d, dbuf, 4, "D.write");
    close(d);
    ok("D.echo");
    printf("SERVER PASS\n");
    (void)s3;
    return 0;
}
