/* The client of `dvk-bench move`: one connection, small requests in a tight loop ('R' + a random
 * block number, 5 bytes; one request outstanding), every 4 KB reply checked against the server's
 * data (word i is splitmix64's (i+1)-th output from SEED, see move_server.c and move_common.h). Times are
 * CLOCK_MONOTONIC microseconds, comparable with any other process's on this machine.
 *
 * Prints "connected", then
 *   "gap PREV NOW"        when two consecutive replies are more than 1 ms apart (their times)
 *   "alive NOW N MAXGAP"  every 100 ms: the time of the last reply, replies so far, and the
 *                         longest gap between consecutive replies since the last "alive"
 * and runs until killed; a wrong reply or a lost connection prints "FAIL ..." and exits 1.
 * usage: move_bench_client HOST PORT MEGABYTES [SEED] [EVERY]
 * EVERY n > 1: only blocks b with b % n == 0 are read (another client may write the others). */
#include <errno.h>
#include <netdb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096

static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000ULL + t.tv_nsec / 1000;
}

static void fail(const char *what, long a) {
    printf("FAIL %s %ld (errno %d)\n", what, a, errno);
    fflush(stdout);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s HOST PORT MEGABYTES [SEED] [EVERY]\n", argv[0]); return 2; }
    double mb = strtod(argv[3], 0);
    uint64_t seed = argc > 4 ? strtoull(argv[4], 0, 10) : 42;
    uint32_t every = argc > 5 ? (uint32_t)strtoul(argv[5], 0, 10) : 1;
    uint32_t nblocks = (uint32_t)(mb * 1024 * 1024 / BLOCK);
    if (nblocks == 0) nblocks = 1;
    if (every == 0 || every > nblocks) every = 1;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(argv[1], argv[2], &hints, &res);
    if (rc) { printf("FAIL getaddrinfo %s: %s\n", argv[1], gai_strerror(rc)); return 1; }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, res->ai_addr, res->ai_addrlen)) fail("connect", 0);
    printf("connected\n");
    fflush(stdout);
    uint64_t x = 0x2545f4914f6cdd1dULL ^ (uint64_t)getpid(), n = 0, max_gap = 0;
    uint64_t last = now_us(), last_alive = last;
    unsigned char req[5] = {'R'};
    uint64_t reply[BLOCK / 8];
    for (;;) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint32_t b = (uint32_t)(x % (nblocks / every)) * every;
        memcpy(req + 1, &b, 4);
        for (size_t off = 0; off < sizeof req;) {
            ssize_t w = write(fd, req + off, sizeof req - off);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) fail("write returned", (long)w);
            off += w;
        }
        for (size_t off = 0; off < BLOCK;) {
            ssize_t r = read(fd, (char *)reply + off, BLOCK - off);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) fail("read returned", (long)r);
            off += r;
        }
        uint64_t t = now_us();
        for (uint64_t j = 0; j < BLOCK / 8; j++)
            if (reply[j] != mix(seed + ((uint64_t)b * (BLOCK / 8) + j + 1) * 0x9e3779b97f4a7c15ULL))
                fail("wrong data in block", (long)b);
        n++;
        uint64_t gap = t - last;
        if (gap > max_gap) max_gap = gap;
        if (gap > 1000) printf("gap %llu %llu\n", (unsigned long long)last, (unsigned long long)t);
        last = t;
        if (t - last_alive >= 100000) {
            printf("alive %llu %llu %llu\n", (unsigned long long)t, (unsigned long long)n, (unsigned long long)max_gap);
            fflush(stdout);
            last_alive = t;
            max_gap = 0;
        }
    }
}
