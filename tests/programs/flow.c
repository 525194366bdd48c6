/* Per-stream flow control check: one stream whose reader stalls must not hold
 * up another stream to the same server.
 *
 *   flow server PORT               listen on 0.0.0.0:PORT; every connection gets
 *                                  a thread that reads one command line:
 *                                    "FLOOD <bytes>\n"  write <bytes> of a pattern, then close
 *                                    "PING\n"           answer "PONG\n" to every "PING\n" until EOF
 *                                  prints "LISTENING", then "progress <flooded bytes>" every 100 ms
 *   flow flood HOST PORT BYTES     send "FLOOD <BYTES>\n", print "connected", read nothing
 *                                  until a line arrives on stdin, then read and verify
 *                                  everything: "DRAINED <n> ok" or "FAIL ..."
 *   flow ping HOST PORT ROUNDS     ROUNDS request/replies (10 s bound each):
 *                                  "PINGS <n> max_us=<m> total_ms=<t>" or "FAIL ..."
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

static void fill(uint64_t off, uint64_t *buf, size_t len) {
    uint64_t w = off / 8;
    for (size_t i = 0; i < (len + 7) / 8; i++, w++) {
        uint64_t x = w * 0x9E3779B97F4A7C15ull;
        buf[i] = x ^ (x >> 29) ^ 0x5555AAAA5555AAAAull;
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static atomic_ullong flooded;

static int read_line(int fd, char *buf, size_t n) {
    size_t i = 0;
    while (i + 1 < n) {
        ssize_t r = read(fd, buf + i, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        if (buf[i] == '\n') {
            buf[i] = 0;
            return (int)i;
        }
        i++;
    }
    return -1;
}

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        c += w;
        n -= w;
    }
    return 0;
}

static void *serve(void *arg) {
    int fd = (int)(intptr_t)arg;
    char line[64];
    if (read_line(fd, line, sizeof line) < 0) {
        close(fd);
        return NULL;
    }
    if (strncmp(line, "FLOOD ", 6) == 0) {
        uint64_t total = strtoull(line + 6, NULL, 10), off = 0;
        uint64_t *buf = malloc(CHUNK);
        while (off < total) {
            size_t len = total - off < CHUNK ? (size_t)(total - off) : CHUNK;
            fill(off, buf, len);
            size_t done = 0;
            while (done < len) {
                /* Small writes so that the progress counter is fine-grained. */
                size_t part = len - done < 16384 ? len - done : 16384;
                if (write_all(fd, (char *)buf + done, part) < 0) {
                    printf("flood write failed after %" PRIu64 ": %s\n", off + done, strerror(errno));
                    fflush(stdout);
                    free(buf);
                    close(fd);
                    return NULL;
                }
                done += part;
                atomic_fetch_add(&flooded, part);
            }
            off += len;
        }
        free(buf);
        printf("flood done %" PRIu64 "\n", total);
        fflush(stdout);
    } else if (strcmp(line, "PING") == 0) {
        do {
            if (write_all(fd, "PONG\n", 5) < 0) break;
        } while (read_line(fd, line, sizeof line) >= 0 && strcmp(line, "PING") == 0);
    }
    close(fd);
    return NULL;
}

static void *progress(void *arg) {
    (void)arg;
    for (;;) {
        printf("progress %llu\n", (unsigned long long)atomic_load(&flooded));
        fflush(stdout);
        usleep(100000);
    }
    return NULL;
}

static int dial(const char *host, const char *port) {
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        printf("FAIL getaddrinfo %s: %s\n", host, gai_strerror(rc));
        exit(1);
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
        printf("FAIL connect %s:%s: %s\n", host, port, strerror(errno));
        exit(1);
    }
    freeaddrinfo(res);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "server") == 0) {
        int l = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        if (bind(l, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(l, 16) != 0) {
            printf("FAIL bind/listen: %s\n", strerror(errno));
            return 1;
        }
        printf("LISTENING\n");
        fflush(stdout);
        pthread_t th;
        pthread_create(&th, NULL, progress, NULL);
        for (;;) {
            int fd = accept(l, NULL, NULL);
            if (fd < 0) {
                if (errno == EINTR) continue;
                printf("FAIL accept: %s\n", strerror(errno));
                return 1;
            }
            pthread_create(&th, NULL, serve, (void *)(intptr_t)fd);
            pthread_detach(th);
        }
    }
    if (argc == 5 && strcmp(argv[1], "flood") == 0) {
        uint64_t total = strtoull(argv[4], NULL, 10);
        int fd = dial(argv[2], argv[3]);
        char cmd[64];
        int n = snprintf(cmd, sizeof cmd, "FLOOD %" PRIu64 "\n", total);
        write_all(fd, cmd, n);
        printf("connected\n");
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 1;
        /* Stalled no more: the backlog may be large, so allow long pauses per read. */
        struct timeval tv = {.tv_sec = 60};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        unsigned char *buf = malloc(CHUNK);
        uint64_t *expect = malloc(CHUNK);
        uint64_t got = 0;
        int eof = 0;
        double t0 = now();
        while (!eof) {
            size_t f = 0;
            while (f < CHUNK) {
                ssize_t r = read(fd, buf + f, CHUNK - f);
                if (r < 0 && errno == EINTR) continue;
                if (r < 0) {
                    printf("FAIL read after %" PRIu64 ": %s\n", got + f, strerror(errno));
                    return 1;
                }
                if (r == 0) {
                    eof = 1;
                    break;
                }
                f += r;
            }
            fill(got, expect, f);
            if (memcmp(buf, expect, f) != 0) {
                size_t i = 0;
                while (buf[i] == ((unsigned char *)expect)[i]) i++;
                printf("FAIL data differs at byte %" PRIu64 "\n", got + i);
                return 1;
            }
            got += f;
        }
        if (got != total) {
            printf("FAIL EOF after %" PRIu64 " of %" PRIu64 "\n", got, total);
            return 1;
        }
        printf("DRAINED %" PRIu64 " ok secs=%.3f\n", got, now() - t0);
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "ping") == 0) {
        int rounds = atoi(argv[4]);
        int fd = dial(argv[2], argv[3]);
        double t0 = now(), worst = 0;
        for (int i = 0; i < rounds; i++) {
            double t = now();
            if (write_all(fd, "PING\n", 5) < 0) {
                printf("FAIL write round %d: %s\n", i, strerror(errno));
                return 1;
            }
            char line[16];
            if (read_line(fd, line, sizeof line) < 0 || strcmp(line, "PONG") != 0) {
                printf("FAIL no PONG in round %d within 10 s: %s\n", i, strerror(errno));
                return 1;
            }
            if (now() - t > worst) worst = now() - t;
        }
        printf("PINGS %d max_us=%.0f total_ms=%.1f\n", rounds, worst * 1e6, (now() - t0) * 1e3);
        close(fd);
        return 0;
    }
    fprintf(stderr, "usage: flow server PORT | flood HOST PORT BYTES | ping HOST PORT ROUNDS\n");
    return 2;
}
