/* The DVS paper's evaluation client: models the server's data (same seed), sends COUNT requests
 * with a random 4 KB block each over CONNS connections (round robin), checks every reply byte
 * for byte, then reads the server's whole data back and checks it. Each request waits PAUSE_US
 * after its reply. Prints "progress N" every 100 requests, then
 *   "DONE requests=N max_gap_us=G"   (G: the longest wait for one reply)
 * and exits 0; any mismatch or error prints "FAIL ..." and exits 1.
 * With SLICE k/n, it writes and checks only the blocks b with b % n == k, so n clients can
 * share one server.
 * usage: move_client HOST PORT MEGABYTES COUNT [CONNS] [PAUSE_US] [SEED] [SLICE] */
#include <errno.h>
#include <netdb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "move_common.h"
static void fail(const char *fmt, long a, long b) {
    printf("FAIL ");
    printf(fmt, a, b);
    printf(" (errno %d)\n", errno);
    fflush(stdout);
    exit(1);
}
static void send_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fail("write on connection %ld (%ld)", fd, w);
        c += w;
        n -= w;
    }
}
static void recv_all(int fd, void *p, size_t n) {
    char *c = p;
    while (n) {
        ssize_t r = read(fd, c, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) fail("read on connection %ld returned %ld", fd, r);
        c += r;
        n -= r;
    }
}
static uint64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000ULL + t.tv_nsec / 1000;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s HOST PORT MEGABYTES COUNT [CONNS] [PAUSE_US] [SEED]\n", argv[0]); return 2; }
    size_t mb = strtoul(argv[3], 0, 10);
    long count = atol(argv[4]);
    int nconn = argc > 5 ? atoi(argv[5]) : 1;
    long pause_us = argc > 6 ? atol(argv[6]) : 0;
    rng = argc > 7 ? strtoull(argv[7], 0, 10) : 42;
    unsigned slice_k = 0, slice_n = 1;
    if (argc > 8 && sscanf(argv[8], "%u/%u", &slice_k, &slice_n) != 2) { printf("FAIL bad slice %s\n", argv[8]); return 2; }
    if (slice_n == 0 || slice_k >= slice_n) { printf("FAIL bad slice %s\n", argv[8]); return 2; }
    uint32_t nblocks = (uint32_t)(mb * 1024 * 1024 / BLOCK);
    unsigned char *model = malloc((size_t)nblocks * BLOCK);
    for (size_t i = 0; i < (size_t)nblocks * BLOCK / 8; i++) ((uint64_t *)model)[i] = next64();
    uint64_t req_rng = 0x1234567ULL ^ (uint64_t)getpid();
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(argv[1], argv[2], &hints, &res);
    if (rc) { printf("FAIL getaddrinfo %s: %s\n", argv[1], gai_strerror(rc)); return 1; }
    int *fds = calloc(nconn, sizeof(int));
    for (int i = 0; i < nconn; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fds[i], res->ai_addr, res->ai_addrlen)) fail("connect %ld of %ld", i, nconn);
    }
    printf("connected %d\n", nconn);
    fflush(stdout);
    unsigned char req[1 + 4 + BLOCK], reply[8 + BLOCK];
    uint64_t max_gap = 0;
    for (long i = 0; i < count; i++) {
        int fd = fds[i % nconn];
        uint64_t save = rng;
        rng = req_rng;
        uint32_t b = (uint32_t)(next64() % (nblocks / slice_n)) * slice_n + slice_k;
        req[0] = 'W';
        memcpy(req + 1, &b, 4);
        for (int j = 0; j < BLOCK / 8; j++) ((uint64_t *)(req + 5))[j] = next64();
        req_rng = rng;
        rng = save;
        memcpy(model + (size_t)b * BLOCK, req + 5, BLOCK);
        uint64_t t0 = now_us();
        send_all(fd, req, sizeof req);
        recv_all(fd, reply, sizeof reply);
        uint64_t gap = now_us() - t0;
        if (gap > max_gap) max_gap = gap;
        uint64_t h;
        memcpy(&h, reply, 8);
        if (h != fnv(model + (size_t)b * BLOCK, BLOCK)) fail("request %ld: checksum of block %ld differs", i, b);
        if (slice_n == 1 && memcmp(reply + 8, model + (size_t)((b + 1) % nblocks) * BLOCK, BLOCK))
            fail("request %ld: next block %ld differs", i, (b + 1) % nblocks);
        if (i % 100 == 99) { printf("progress %ld\n", i + 1); fflush(stdout); }
        if (pause_us) usleep(pause_us);
    }
    /* The whole data, through the first connection. */
    for (uint32_t b = slice_k; b < nblocks; b += slice_n) {
        req[0] = 'R';
        memcpy(req + 1, &b, 4);
        send_all(fds[0], req, 5);
        recv_all(fds[0], reply, BLOCK);
        if (memcmp(reply, model + (size_t)b * BLOCK, BLOCK)) fail("final check: block %ld of %ld differs", b, nblocks);
    }
    for (int i = 0; i < nconn; i++) {
        send_all(fds[i], "Q", 1);
        char bye[4];
        recv_all(fds[i], bye, 4);
        if (memcmp(bye, "bye\n", 4)) fail("connection %ld: no goodbye (%ld)", i, 0);
        close(fds[i]);
    }
    printf("DONE requests=%ld max_gap_us=%llu\n", count, (unsigned long long)max_gap);
    return 0;
}
