/* Streams N bytes in both directions at once over one TCP connection and
 * verifies every byte received.
 *
 *   stream_check server PORT BYTES [NPROBES]
 *                                         listen on 0.0.0.0:PORT, discard NPROBES connections
 *                                         (the test's net_probe), then accept one connection
 *   stream_check client HOST PORT BYTES   connect to HOST:PORT (getaddrinfo)
 *
 * Each side sends BYTES of a deterministic pseudo-random stream (the client's
 * stream has seed 1, the server's seed 2), then shutdown(SHUT_WR); at the same
 * time it reads until EOF and compares every byte with the stream the peer must
 * have sent. Every 8-byte word depends on its position in the stream, so a lost,
 * duplicated or reordered block is caught. It prints one line:
 *
 *   PASS sent=N sent_hash=H received=N received_hash=H secs=S
 *   FAIL <what> ...
 *
 * and exits 0 on PASS. The hashes let the test cross-check the two ends.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024) /* multiple of 8 */
#define TABLE_WORDS 8192   /* power of two */

struct stream {
    uint64_t table[TABLE_WORDS];
    uint64_t seed;
};

static void stream_init(struct stream *s, uint64_t seed) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
    for (int i = 0; i < TABLE_WORDS; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s->table[i] = x;
    }
    s->seed = seed;
}

/* Fills buf with the words of the stream starting at byte offset `off` (a
 * multiple of 8); `len` is rounded up to whole words (buf must have room). */
static void stream_fill(const struct stream *s, uint64_t off, uint64_t *buf, size_t len) {
    uint64_t w = off / 8;
    size_t words = (len + 7) / 8;
    for (size_t i = 0; i < words; i++, w++)
        buf[i] = s->table[w & (TABLE_WORDS - 1)] ^ (w * 0xD6E8FEB86659FD93ull) ^ s->seed;
}

/* Word-wise hash of a block (tail zero-padded), continued across blocks. */
static uint64_t hash_block(uint64_t h, const unsigned char *p, size_t len) {
    size_t words = len / 8;
    const uint64_t *q = (const uint64_t *)p;
    for (size_t i = 0; i < words; i++) {
        h = (h ^ q[i]) * 0x100000001B3ull;
        h ^= h >> 29;
    }
    if (len % 8) {
        uint64_t last = 0;
        memcpy(&last, p + words * 8, len % 8);
        h = (h ^ last) * 0x100000001B3ull;
        h ^= h >> 29;
    }
    return h;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct sender {
    int fd;
    uint64_t total;
    uint64_t seed;
    uint64_t sent;
    uint64_t hash;
    int err;
};

static void *send_all(void *arg) {
    struct sender *s = arg;
    struct stream *st = malloc(sizeof *st);
    uint64_t *buf = malloc(CHUNK);
    if (!st || !buf) {
        s->err = ENOMEM;
        return NULL;
    }
    stream_init(st, s->seed);
    s->hash = 0xCBF29CE484222325ull;
    while (s->sent < s->total) {
        size_t len = s->total - s->sent < CHUNK ? (size_t)(s->total - s->sent) : CHUNK;
        stream_fill(st, s->sent, buf, len);
        s->hash = hash_block(s->hash, (unsigned char *)buf, len);
        size_t done = 0;
        while (done < len) {
            ssize_t n = write(s->fd, (char *)buf + done, len - done);
            if (n < 0) {
                if (errno == EINTR) continue;
                s->err = errno;
                free(st);
                free(buf);
                return NULL;
            }
            done += n;
        }
        s->sent += len;
    }
    if (shutdown(s->fd, SHUT_WR) != 0) s->err = errno;
    free(st);
    free(buf);
    return NULL;
}

static int run(int fd, uint64_t total, uint64_t send_seed, uint64_t recv_seed) {
    double t0 = now();
    struct sender snd = {.fd = fd, .total = total, .seed = send_seed};
    pthread_t th;
    if (pthread_create(&th, NULL, send_all, &snd) != 0) {
        printf("FAIL pthread_create\n");
        return 1;
    }
    struct stream *st = malloc(sizeof *st);
    unsigned char *buf = malloc(CHUNK);
    uint64_t *expect = malloc(CHUNK);
    stream_init(st, recv_seed);
    uint64_t received = 0, hash = 0xCBF29CE484222325ull;
    int bad = 0, eof = 0;
    while (!eof && !bad) {
        /* Fill one aligned chunk (or up to EOF), then verify it. */
        size_t fill = 0;
        while (fill < CHUNK) {
            ssize_t n = read(fd, buf + fill, CHUNK - fill);
            if (n < 0) {
                if (errno == EINTR) continue;
                printf("FAIL read after %" PRIu64 " bytes: %s\n", received + fill, strerror(errno));
                fflush(stdout);
                return 1;
            }
            if (n == 0) {
                eof = 1;
                break;
            }
            fill += n;
        }
        if (fill == 0) break;
        if (received + fill > total) {
            printf("FAIL received more than %" PRIu64 " bytes (at least %" PRIu64 ")\n", total,
                   received + fill);
            fflush(stdout);
            return 1;
        }
        stream_fill(st, received, expect, fill);
        if (memcmp(buf, expect, fill) != 0) {
            size_t i = 0;
            while (i < fill && buf[i] == ((unsigned char *)expect)[i]) i++;
            printf("FAIL data differs at byte %" PRIu64 " (got 0x%02x, expected 0x%02x)\n", received + i,
                   buf[i], ((unsigned char *)expect)[i]);
            bad = 1;
        }
        hash = hash_block(hash, buf, fill);
        received += fill;
    }
    pthread_join(th, NULL);
    double secs = now() - t0;
    if (bad) {
        fflush(stdout);
        return 1;
    }
    if (snd.err) {
        printf("FAIL write after %" PRIu64 " bytes: %s\n", snd.sent, strerror(snd.err));
        fflush(stdout);
        return 1;
    }
    if (received != total) {
        printf("FAIL EOF after %" PRIu64 " of %" PRIu64 " bytes\n", received, total);
        fflush(stdout);
        return 1;
    }
    printf("PASS sent=%" PRIu64 " sent_hash=%016" PRIx64 " received=%" PRIu64 " received_hash=%016" PRIx64
           " secs=%.3f\n",
           snd.sent, snd.hash, received, hash, secs);
    fflush(stdout);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "server") == 0) {
        uint64_t total = strtoull(argv[3], NULL, 10);
        int l = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        sa.sin_addr.s_addr = htonl(INADDR_ANY);
        if (bind(l, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(l, 16) != 0) {
            printf("FAIL bind/listen: %s\n", strerror(errno));
            return 1;
        }
        printf("LISTENING\n");
        for (int probes = argc == 5 ? atoi(argv[4]) : 0; probes > 0; probes--) {
            int p = accept(l, NULL, NULL);
            char c;
            if (p < 0 || read(p, &c, 1) != 0) {
                printf("FAIL probe connection: %s\n", strerror(errno));
                return 1;
            }
            close(p);
        }
        int fd = accept(l, NULL, NULL);
        if (fd < 0) {
            printf("FAIL accept: %s\n", strerror(errno));
            return 1;
        }
        return run(fd, total, 2, 1);
    }
    if (argc == 5 && strcmp(argv[1], "client") == 0) {
        uint64_t total = strtoull(argv[4], NULL, 10);
        struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
        int rc = getaddrinfo(argv[2], argv[3], &hints, &res);
        if (rc != 0) {
            printf("FAIL getaddrinfo %s: %s\n", argv[2], gai_strerror(rc));
            return 1;
        }
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
            printf("FAIL connect %s:%s: %s\n", argv[2], argv[3], strerror(errno));
            return 1;
        }
        freeaddrinfo(res);
        return run(fd, total, 1, 2);
    }
    fprintf(stderr, "usage: stream_check server PORT BYTES | client HOST PORT BYTES\n");
    return 2;
}
