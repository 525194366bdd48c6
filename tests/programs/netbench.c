/* The measured program of `dvk-bench net`: the same binary runs bare (direct
 * TCP on 127.0.0.1) and under the shim (through the agents).
 *
 *   netbench server PORT                  listen on 0.0.0.0:PORT, serve connections one by one:
 *                                           "RTT <size> <rounds>\n": echo <size>-byte messages <rounds> times
 *                                           "BULK <bytes>\n": read <bytes> to EOF, answer "OK <n>\n"
 *                                         prints "LISTENING" once listening
 *   netbench rtt HOST PORT SIZE ROUNDS    prints "rtt rounds=R median_us=M p99_us=P mean_us=A"
 *   netbench bulk HOST PORT BYTES         prints "bulk bytes=B secs=S mb_per_s=T"
 * TCP_NODELAY is set on both ends. A warm-up of 200 rounds precedes the timed RTT rounds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WARMUP 200
#define BUF (1 << 20)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int read_exact(int fd, char *p, size_t n) {
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= r;
    }
    return 0;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= w;
    }
    return 0;
}

static int read_line(int fd, char *buf, size_t n) {
    size_t i = 0;
    while (i + 1 < n) {
        if (read_exact(fd, buf + i, 1) < 0) return -1;
        if (buf[i] == '\n') break;
        i++;
    }
    buf[i] = 0;
    return 0;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int dial(const char *host, const char *port) {
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "netbench: getaddrinfo %s: %s\n", host, gai_strerror(rc));
        exit(1);
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
        fprintf(stderr, "netbench: connect %s:%s: %s\n", host, port, strerror(errno));
        exit(1);
    }
    freeaddrinfo(res);
    nodelay(fd);
    return fd;
}

static void serve(int fd) {
    char line[64];
    nodelay(fd);
    if (read_line(fd, line, sizeof line) < 0) return;
    static char buf[BUF];
    size_t size;
    long rounds;
    unsigned long long bytes;
    if (sscanf(line, "RTT %zu %ld", &size, &rounds) == 2 && size <= BUF) {
        for (long i = 0; i < rounds; i++)
            if (read_exact(fd, buf, size) < 0 || write_all(fd, buf, size) < 0) return;
    } else if (sscanf(line, "BULK %llu", &bytes) == 1) {
        unsigned long long got = 0;
        for (;;) {
            ssize_t r = read(fd, buf, BUF);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            got += r;
        }
        char ok[64];
        int n = snprintf(ok, sizeof ok, "OK %llu\n", got);
        write_all(fd, ok, n);
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "server") == 0) {
        int l = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        if (bind(l, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(l, 16) != 0) {
            fprintf(stderr, "netbench: bind/listen: %s\n", strerror(errno));
            return 1;
        }
        printf("LISTENING\n");
        for (;;) {
            int fd = accept(l, NULL, NULL);
            if (fd < 0) {
                if (errno == EINTR) continue;
                return 1;
            }
            serve(fd);
            close(fd);
        }
    }
    if (argc == 6 && strcmp(argv[1], "rtt") == 0) {
        size_t size = strtoul(argv[4], NULL, 10);
        long rounds = atol(argv[5]);
        if (size == 0 || size > BUF || rounds <= 0) return 2;
        int fd = dial(argv[2], argv[3]);
        char hdr[64];
        int n = snprintf(hdr, sizeof hdr, "RTT %zu %ld\n", size, rounds + WARMUP);
        write_all(fd, hdr, n);
        char *buf = calloc(1, size);
        double *t = malloc(sizeof(double) * rounds);
        for (long i = 0; i < rounds + WARMUP; i++) {
            double t0 = now();
            buf[0] = (char)i;
            if (write_all(fd, buf, size) < 0 || read_exact(fd, buf, size) < 0 || buf[0] != (char)i) {
                fprintf(stderr, "netbench: round %ld failed\n", i);
                return 1;
            }
            if (i >= WARMUP) t[i - WARMUP] = now() - t0;
        }
        double sum = 0;
        for (long i = 0; i < rounds; i++) sum += t[i];
        qsort(t, rounds, sizeof(double), cmp);
        printf("rtt rounds=%ld median_us=%.2f p99_us=%.2f mean_us=%.2f\n", rounds, t[rounds / 2] * 1e6,
               t[(long)(rounds * 0.99)] * 1e6, sum / rounds * 1e6);
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "bulk") == 0) {
        unsigned long long bytes = strtoull(argv[4], NULL, 10);
        int fd = dial(argv[2], argv[3]);
        char hdr[64];
        int n = snprintf(hdr, sizeof hdr, "BULK %llu\n", bytes);
        write_all(fd, hdr, n);
        char *buf = malloc(BUF);
        for (size_t i = 0; i < BUF; i++) buf[i] = (char)(i * 131 + 7);
        double t0 = now();
        unsigned long long sent = 0;
        while (sent < bytes) {
            size_t len = bytes - sent < 262144 ? (size_t)(bytes - sent) : 262144;
            if (write_all(fd, buf + (sent % (BUF / 2)), len) < 0) {
                fprintf(stderr, "netbench: write failed after %llu: %s\n", sent, strerror(errno));
                return 1;
            }
            sent += len;
        }
        shutdown(fd, SHUT_WR);
        char line[64];
        unsigned long long got = 0;
        if (read_line(fd, line, sizeof line) < 0 || sscanf(line, "OK %llu", &got) != 1 || got != bytes) {
            fprintf(stderr, "netbench: server got %llu of %llu bytes\n", got, bytes);
            return 1;
        }
        double secs = now() - t0;
        printf("bulk bytes=%llu secs=%.4f mb_per_s=%.1f\n", bytes, secs, bytes / secs / 1e6);
        return 0;
    }
    fprintf(stderr, "usage: netbench server PORT | rtt HOST PORT SIZE ROUNDS | bulk HOST PORT BYTES\n");
    return 2;
}
