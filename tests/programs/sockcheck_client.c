/* Client half of the socket-semantics check (server: sockcheck_server.c).
 *
 *   sockcheck_client HOST PORT BADPORT REALPORT
 *
 * HOST:PORT is the sockcheck_server endpoint (e.g. sock.dc0.dvk), BADPORT a
 * port no endpoint listens on, REALPORT a plain TCP echo server on 127.0.0.1
 * that runs without the shim (0: skip that check). Prints "ok <check>" per
 * check, "FAIL <check>: <detail>" and exits 1 on the first failure,
 * "CLIENT PASS" at the end.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "sockcheck.h"

static void fail(const char *check, const char *fmt, ...) {
    int e = errno;
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL %s: ", check);
    vprintf(fmt, ap);
    printf(" (errno %d %s)\n", e, strerror(e));
    va_end(ap);
    fflush(stdout);
    exit(1);
}

/* A failed check that does not stop the run: reported, and the run ends without PASS. */
static int soft_failures;
static void soft_fail(const char *check, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL %s: ", check);
    vprintf(fmt, ap);
    printf(" (continuing)\n");
    va_end(ap);
    fflush(stdout);
    soft_failures++;
}


static void read_exact(int fd, char *p, size_t n, const char *check) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, p + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fail(check, "read after %zu of %zu bytes", got, n);
        if (r == 0) fail(check, "EOF after %zu of %zu bytes", got, n);
        got += r;
    }
}

static void expect_eof(int fd, const char *check) {
    char c;
    ssize_t r;
    do r = read(fd, &c, 1);
    while (r < 0 && errno == EINTR);
    if (r != 0) fail(check, "read returned %zd, want EOF (0)", r);
}

/* Sets a 10 s receive timeout so that a missing reply fails instead of hanging. */
static void bound(int fd) {
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: sockcheck_client HOST PORT BADPORT REALPORT\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *host = argv[1];
    int port = atoi(argv[2]), badport = atoi(argv[3]), realport = atoi(argv[4]);
    char s1[64], s2[64];
    socklen_t len;

    /* ---- name lookup ---- */
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, argv[2], &hints, &res);
    if (rc != 0) fail("getaddrinfo", "%s: %s", host, gai_strerror(rc));
    struct sockaddr_in vip;
    if (res->ai_family != AF_INET || res->ai_addrlen != sizeof vip) fail("getaddrinfo", "family %d", res->ai_family);
    memcpy(&vip, res->ai_addr, sizeof vip);
    freeaddrinfo(res);
    if (!is_virtual(&vip) || ntohs(vip.sin_port) != port)
        fail("getaddrinfo", "%s -> %s, want 127.77.x.x:%d", host, fmt_addr(&vip, s1, 64), port);
    printf("vip %s\n", fmt_addr(&vip, s1, 64));
    ok("getaddrinfo");
    struct addrinfo hints2 = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    rc = getaddrinfo(host, NULL, &hints2, &res);
    if (rc != 0) fail("getaddrinfo-unspec", "%s: %s", host, gai_strerror(rc));
    int found = 0;
    for (struct addrinfo *p = res; p; p = p->ai_next)
        if (p->ai_family == AF_INET &&
            ((struct sockaddr_in *)p->ai_addr)->sin_addr.s_addr == vip.sin_addr.s_addr)
            found = 1;
    freeaddrinfo(res);
    if (!found) fail("getaddrinfo-unspec", "no AF_INET answer with the VIP");
    ok("getaddrinfo-unspec");
    struct hostent *he = gethostbyname(host);
    if (!he) fail("gethostbyname", "%s: h_errno %d", host, h_errno);
    if (he->h_addrtype != AF_INET || he->h_length != 4 || !he->h_addr_list[0] ||
        memcmp(he->h_addr_list[0], &vip.sin_addr, 4) != 0)
        fail("gethostbyname", "answer differs from getaddrinfo's");
    ok("gethostbyname");

    /* ---- refused ---- */
    struct sockaddr_in bad = vip;
    bad.sin_port = htons(badport);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    errno = 0;
    if (connect(fd, (struct sockaddr *)&bad, sizeof bad) == 0 || errno != ECONNREFUSED)
        fail("refused-blocking", "connect %s did not give ECONNREFUSED", fmt_addr(&bad, s1, 64));
    close(fd);
    ok("refused-blocking");
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    errno = 0;
    rc = connect(fd, (struct sockaddr *)&bad, sizeof bad);
    if (rc == 0) fail("refused-nonblocking", "connect succeeded");
    if (errno == EINPROGRESS) {
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        if (poll(&pfd, 1, 10000) != 1) fail("refused-nonblocking", "poll timed out");
        int soerr = 0;
        len = sizeof soerr;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0) fail("refused-nonblocking", "SO_ERROR");
        if (soerr != ECONNREFUSED) fail("refused-nonblocking", "SO_ERROR %d (%s), want ECONNREFUSED", soerr, strerror(soerr));
    } else if (errno != ECONNREFUSED) {
        fail("refused-nonblocking", "connect errno is neither EINPROGRESS nor ECONNREFUSED");
    }
    close(fd);
    ok("refused-nonblocking");
    char nosuch[128];
    snprintf(nosuch, sizeof nosuch, "nosuch%d.dc0.dvk", (int)getpid());
    rc = getaddrinfo(nosuch, argv[2], &hints, &res);
    if (rc == 0) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        errno = 0;
        if (connect(fd, res->ai_addr, res->ai_addrlen) == 0 || errno != ECONNREFUSED)
            fail("nosuch-name", "%s resolved and connect did not give ECONNREFUSED", nosuch);
        close(fd);
        freeaddrinfo(res);
        ok("nosuch-name (resolves, refused)");
    } else {
        ok("nosuch-name (does not resolve)");
    }

    /* ---- A: non-blocking connect, readiness, scatter/gather, half-close ---- */
    int a = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    rc = connect(a, (struct sockaddr *)&vip, sizeof vip);
    if (rc != 0 && errno != EINPROGRESS) fail("A.connect-nonblocking", "connect");
    struct pollfd pfd = {.fd = a, .events = POLLOUT};
    if (poll(&pfd, 1, 10000) != 1 || !(pfd.revents & POLLOUT)) fail("A.connect-nonblocking", "no POLLOUT in 10 s");
    int soerr = -1;
    len = sizeof soerr;
    if (getsockopt(a, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0 || soerr != 0)
        fail("A.connect-nonblocking", "SO_ERROR %d", soerr);
    ok(rc == 0 ? "A.connect-nonblocking (immediate)" : "A.connect-nonblocking (EINPROGRESS)");
    struct sockaddr_in peer, local;
    memset(&peer, 0, sizeof peer);
    memset(&local, 0, sizeof local);
    len = sizeof peer;
    if (getpeername(a, (struct sockaddr *)&peer, &len) != 0) fail("A.getpeername", "getpeername");
    if (peer.sin_family != AF_INET || peer.sin_addr.s_addr != vip.sin_addr.s_addr || peer.sin_port != vip.sin_port)
        fail("A.getpeername", "%s, want %s", fmt_addr(&peer, s1, 64), fmt_addr(&vip, s2, 64));
    ok("A.getpeername");
    len = sizeof local;
    if (getsockname(a, (struct sockaddr *)&local, &len) != 0) fail("A.getsockname", "getsockname");
    if (local.sin_family != AF_INET || !is_virtual(&local))
        fail("A.getsockname", "%s (family %d), want 127.77.x.x", fmt_addr(&local, s1, 64), local.sin_family);
    ok("A.getsockname");
    /* A duplicate of the fd is the same TCP socket. */
    int dups[3] = {dup(a), fcntl(a, F_DUPFD_CLOEXEC, 200), dup2(a, 201)};
    const char *how[3] = {"dup", "F_DUPFD_CLOEXEC", "dup2"};
    int dup_ok = 1;
    for (int i = 0; i < 3; i++) {
        struct sockaddr_in dp;
        memset(&dp, 0, sizeof dp);
        len = sizeof dp;
        if (dups[i] < 0 || getpeername(dups[i], (struct sockaddr *)&dp, &len) != 0) {
            soft_fail("A.dup-getpeername", "%s: getpeername failed: %s", how[i], strerror(errno));
            dup_ok = 0;
        } else if (dp.sin_family != AF_INET || dp.sin_addr.s_addr != vip.sin_addr.s_addr ||
                   dp.sin_port != vip.sin_port) {
            soft_fail("A.dup-getpeername", "%s: getpeername gives family %d, want AF_INET %s", how[i], dp.sin_family,
                      fmt_addr(&vip, s2, 64));
            dup_ok = 0;
        }
        if (dups[i] >= 0) close(dups[i]);
    }
    if (dup_ok) ok("A.dup-getpeername");
    /* Wait for the server's go byte (poll POLLIN), then switch to blocking. */
    pfd.events = POLLIN;
    if (poll(&pfd, 1, 10000) != 1 || !(pfd.revents & POLLIN)) fail("A.poll-in", "no POLLIN in 10 s");
    int fl = fcntl(a, F_GETFL);
    if (!(fl & O_NONBLOCK)) fail("A.flags", "O_NONBLOCK lost");
    fcntl(a, F_SETFL, fl & ~O_NONBLOCK);
    bound(a);
    char g;
    read_exact(a, &g, 1, "A.go");
    if (g != 'G') fail("A.go", "got %c", g);
    ok("A.poll-in");
    char body[10000];
    for (int i = 0; i < 10000; i++) body[i] = 'a' + i % 26;
    struct iovec req[3] = {{"REQ1", 4}, {body, sizeof body}, {"END!", 4}};
    size_t sent = 0;
    while (sent < 10008) {
        /* writev may be partial: resend the rest. */
        struct iovec iov[3];
        int cnt = 0;
        size_t skip = sent;
        for (int i = 0; i < 3; i++) {
            if (skip >= req[i].iov_len) {
                skip -= req[i].iov_len;
                continue;
            }
            iov[cnt].iov_base = (char *)req[i].iov_base + skip;
            iov[cnt++].iov_len = req[i].iov_len - skip;
            skip = 0;
        }
        ssize_t w = writev(a, iov, cnt);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fail("A.writev", "writev");
        sent += w;
    }
    ok("A.writev");
    char rhead[4], report[64];
    size_t got = 0;
    while (got < 68) {
        struct iovec iov[2];
        int cnt = 0;
        if (got < 4) {
            iov[cnt].iov_base = rhead + got;
            iov[cnt++].iov_len = 4 - got;
            iov[cnt].iov_base = report;
            iov[cnt++].iov_len = 64;
        } else {
            iov[cnt].iov_base = report + (got - 4);
            iov[cnt++].iov_len = 68 - got;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = cnt};
        ssize_t r = recvmsg(a, &mh, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) fail("A.recvmsg", "recvmsg returned %zd after %zu bytes", r, got);
        got += r;
    }
    if (memcmp(rhead, "REP1", 4) != 0) fail("A.recvmsg", "header %.4s", rhead);
    ok("A.recvmsg");
    report[63] = 0;
    printf("server-report %s\n", report);
    char want_local[64], want_peer[64], srv_peer[64], srv_local[64];
    if (sscanf(report, "peer=%63s local=%63s", srv_peer, srv_local) != 2) fail("A.report", "unparsable: %s", report);
    fmt_addr(&vip, want_local, 64);
    fmt_addr(&local, want_peer, 64);
    if (strcmp(srv_local, want_local) != 0)
        fail("A.addresses-agree", "server's getsockname %s != client's getpeername %s", srv_local, want_local);
    char *colon = strrchr(want_peer, ':');
    if (strncmp(srv_peer, want_peer, colon - want_peer + 1) != 0)
        fail("A.addresses-agree", "server's getpeername %s has another IP than client's getsockname %s", srv_peer,
             want_peer);
    ok("A.addresses-agree-ip");
    if (strcmp(srv_peer, want_peer) != 0)
        soft_fail("A.addresses-agree-port", "server's getpeername %s != client's getsockname %s", srv_peer, want_peer);
    else
        ok("A.addresses-agree-port");
    for (int i = 0; i < 1000; i++) write_all(a, "HALF", 4, "A.half");
    if (shutdown(a, SHUT_WR) != 0) fail("A.shutdown", "shutdown(SHUT_WR)");
    errno = 0;
    if (send(a, "x", 1, MSG_NOSIGNAL) != -1 || errno != EPIPE) fail("A.send-after-shutdown", "want EPIPE");
    ok("A.send-after-shutdown-EPIPE");
    fd_set rs;
    FD_ZERO(&rs);
    FD_SET(a, &rs);
    struct timeval tv = {.tv_sec = 10};
    if (select(a + 1, &rs, NULL, NULL, &tv) != 1 || !FD_ISSET(a, &rs)) fail("A.select", "not readable in 10 s");
    ok("A.select");
    char reply[9];
    read_exact(a, reply, 9, "A.reply-after-half-close");
    if (memcmp(reply, "GOT 4000\n", 9) != 0) fail("A.reply-after-half-close", "got %.9s", reply);
    expect_eof(a, "A.eof");
    ok("A.half-close");
    close(a);

    /* ---- B: blocking connect, options, echo ---- */
    int b = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(b, (struct sockaddr *)&vip, sizeof vip) != 0) fail("B.connect", "connect");
    if (!(fcntl(b, F_GETFD) & FD_CLOEXEC)) fail("B.cloexec", "SOCK_CLOEXEC lost by connect");
    if (fcntl(b, F_GETFL) & O_NONBLOCK) fail("B.blocking", "socket became non-blocking");
    int one = 1;
    if (setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) fail("B.TCP_NODELAY", "setsockopt");
    if (setsockopt(b, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) != 0) fail("B.SO_KEEPALIVE", "setsockopt");
    if (setsockopt(b, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) fail("B.SO_REUSEADDR", "setsockopt");
    int v = 0;
    len = sizeof v;
    if (getsockopt(b, SOL_SOCKET, SO_TYPE, &v, &len) != 0 || v != SOCK_STREAM) fail("B.SO_TYPE", "%d", v);
    ok("B.sockopts");
    v = 0;
    len = sizeof v;
    if (getsockopt(b, IPPROTO_TCP, TCP_NODELAY, &v, &len) != 0 || v == 0)
        soft_fail("B.TCP_NODELAY-readback", "getsockopt(TCP_NODELAY) after setting it gives %d", v);
    else
        ok("B.TCP_NODELAY-readback");
    bound(b);
    static char big[65536], back[65536];
    for (size_t i = 0; i < sizeof big; i++) big[i] = (char)(i * 7 + (i >> 8));
    for (size_t off = 0; off < sizeof big;) {
        ssize_t w = send(b, big + off, sizeof big - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fail("B.send", "send");
        off += w;
    }
    if (shutdown(b, SHUT_WR) != 0) fail("B.shutdown", "shutdown");
    for (size_t off = 0; off < sizeof back;) {
        ssize_t r = recv(b, back + off, sizeof back - off, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) fail("B.recv", "recv returned %zd after %zu bytes", r, off);
        off += r;
    }
    if (memcmp(big, back, sizeof big) != 0) fail("B.echo", "echo differs");
    expect_eof(b, "B.eof");
    ok("B.echo");
    close(b);

    /* ---- C: EOF on the server's close ---- */
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&vip, sizeof vip) != 0) fail("C.connect", "connect");
    bound(c);
    char bye[3];
    read_exact(c, bye, 3, "C.read");
    if (memcmp(bye, "bye", 3) != 0) fail("C.read", "got %.3s", bye);
    expect_eof(c, "C.eof");
    ok("C.eof-on-peer-shutdown");
    /* The server shut down only its sending side: it still reads. */
    write_all(c, "thanks", 6, "C.write-after-peer-shutdown");
    close(c);
    ok("C.write-after-peer-shutdown");

    /* ---- D: bind and a receive timeout before connect ---- */
    int d = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval rto = {.tv_sec = 0, .tv_usec = 300000};
    if (setsockopt(d, SOL_SOCKET, SO_RCVTIMEO, &rto, sizeof rto) != 0) fail("D.SO_RCVTIMEO", "setsockopt");
    struct sockaddr_in any = {.sin_family = AF_INET};
    any.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(d, (struct sockaddr *)&any, sizeof any) != 0) fail("D.bind", "bind 0.0.0.0:0 before connect");
    if (connect(d, (struct sockaddr *)&vip, sizeof vip) != 0) fail("D.connect-after-bind", "connect");
    /* Options set before connect stay set: the server sends nothing until it gets 4 bytes, so a read times out. */
    struct timeval got_rto = {0};
    len = sizeof got_rto;
    getsockopt(d, SOL_SOCKET, SO_RCVTIMEO, &got_rto, &len);
    if (got_rto.tv_sec != 0 || got_rto.tv_usec < 200000 || got_rto.tv_usec > 400000) {
        soft_fail("D.option-set-before-connect", "SO_RCVTIMEO set to 0.3 s before connect reads back as %ld.%06ld s",
                  (long)got_rto.tv_sec, (long)got_rto.tv_usec);
    } else {
        char nothing;
        errno = 0;
        ssize_t r = read(d, &nothing, 1);
        if (r != -1 || (errno != EAGAIN && errno != EWOULDBLOCK))
            soft_fail("D.option-set-before-connect", "read with a 0.3 s SO_RCVTIMEO returned %zd", r);
        else
            ok("D.option-set-before-connect");
    }
    bound(d);
    write_all(d, "ding", 4, "D.write");
    char dback[4];
    read_exact(d, dback, 4, "D.read");
    if (memcmp(dback, "ding", 4) != 0) fail("D.echo", "got %.4s", dback);
    expect_eof(d, "D.eof");
    close(d);
    ok("D.bind-then-connect");

    /* ---- real TCP to a non-shim listener ---- */
    if (realport) {
        struct sockaddr_in ra = {.sin_family = AF_INET, .sin_port = htons(realport)};
        ra.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int r = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(r, (struct sockaddr *)&ra, sizeof ra) != 0) fail("real-tcp.connect", "127.0.0.1:%d", realport);
        struct sockaddr_in rp;
        len = sizeof rp;
        if (getpeername(r, (struct sockaddr *)&rp, &len) != 0 || rp.sin_family != AF_INET ||
            rp.sin_addr.s_addr != ra.sin_addr.s_addr || rp.sin_port != ra.sin_port)
            fail("real-tcp.getpeername", "%s", fmt_addr(&rp, s1, 64));
        int dom = 0;
        len = sizeof dom;
        if (getsockopt(r, SOL_SOCKET, SO_DOMAIN, &dom, &len) != 0 || dom != AF_INET)
            fail("real-tcp.SO_DOMAIN", "domain %d: the socket is not a kernel AF_INET socket", dom);
        bound(r);
        write_all(r, "hello real\n", 11, "real-tcp.write");
        char echo[11];
        read_exact(r, echo, 11, "real-tcp.read");
        if (memcmp(echo, "hello real\n", 11) != 0) fail("real-tcp.echo", "got %.11s", echo);
        close(r);
        ok("real-tcp");
    }

    /* ---- AF_UNIX socketpair ---- */
    int sp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) != 0) fail("socketpair", "socketpair");
    write_all(sp[0], "ping", 4, "socketpair.write");
    char pb[4];
    read_exact(sp[1], pb, 4, "socketpair.read");
    write_all(sp[1], "pong", 4, "socketpair.write");
    read_exact(sp[0], pb, 4, "socketpair.read");
    if (memcmp(pb, "pong", 4) != 0) fail("socketpair", "got %.4s", pb);
    struct sockaddr_un un;
    len = sizeof un;
    if (getsockname(sp[0], (struct sockaddr *)&un, &len) != 0 || un.sun_family != AF_UNIX)
        fail("socketpair.getsockname", "family %d", un.sun_family);
    close(sp[0]);
    close(sp[1]);
    ok("socketpair");

    /* ---- UDP on 127.0.0.1 ---- */
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in ua = {.sin_family = AF_INET};
    ua.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(u, (struct sockaddr *)&ua, sizeof ua) != 0) fail("udp.bind", "bind");
    len = sizeof ua;
    if (getsockname(u, (struct sockaddr *)&ua, &len) != 0 || ua.sin_family != AF_INET || ua.sin_port == 0)
        fail("udp.getsockname", "getsockname");
    if (sendto(u, "dgram", 5, 0, (struct sockaddr *)&ua, sizeof ua) != 5) fail("udp.sendto", "sendto");
    bound(u);
    char db[16];
    struct sockaddr_in dfrom;
    len = sizeof dfrom;
    ssize_t dn = recvfrom(u, db, sizeof db, 0, (struct sockaddr *)&dfrom, &len);
    if (dn != 5 || memcmp(db, "dgram", 5) != 0 || dfrom.sin_port != ua.sin_port) fail("udp.recvfrom", "got %zd", dn);
    close(u);
    ok("udp");

    if (soft_failures) {
        printf("CLIENT FAIL: %d check(s) failed, see FAIL lines\n", soft_failures);
        return 1;
    }
    printf("CLIENT PASS\n");
    return 0;
}
