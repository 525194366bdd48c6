/* Helpers shared by the sockcheck client and server. */
#ifndef SOCKCHECK_H
#define SOCKCHECK_H
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <errno.h>
#include <stdio.h>
#include <unistd.h>

/* Each program reports a failed check its own way. */
static void fail(const char *check, const char *fmt, ...);

static void ok(const char *check) {
    printf("ok %s\n", check);
    fflush(stdout);
}

static const char *fmt_addr(const struct sockaddr_in *a, char *out, size_t n) {
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
    snprintf(out, n, "%s:%u", ip, ntohs(a->sin_port));
    return out;
}

/* In 127.77.0.0/16, dvk's virtual IP range. */
static int is_virtual(const struct sockaddr_in *a) {
    uint32_t ip = ntohl(a->sin_addr.s_addr);
    return (ip >> 16) == ((127u << 8) | 77u);
}
static void write_all(int fd, const void *p, size_t n, const char *check) {
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fail(check, "write");
        c += w;
        n -= w;
    }
}
#endif
