#define _GNU_SOURCE
/* The server of `dvk-bench move`: holds MEGABYTES (MiB, may be fractional) of pseudo-random data,
 * all written (resident), and serves 4 KB blocks of it over any number of connections (epoll, one
 * thread). Word i of the data is splitmix64's (i+1)-th output from SEED, so a client can check
 * any block without a copy of the data.
 *
 *   request:  'R' u32 block  -> reply the 4096 bytes of block (modulo the block count)
 *             'Q'            -> close that connection
 * usage: move_bench_server PORT MEGABYTES [SEED]   prints "listening BLOCKS" once it listens.
 * PORT 0: no socket at all; prints "ready BLOCKS", points stdio at /dev/null and sleeps (the
 * process of the local dump + restore baseline). */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BLOCK 4096
#define MAXC 1024

static uint64_t mix(uint64_t z) { /* splitmix64's output function */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

struct conn { int fd; unsigned char in[5]; size_t have; unsigned char out[BLOCK]; size_t out_len, out_off; };
static struct conn conns[MAXC];

static int flush_out(struct conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) return 0;
        if (w <= 0) return -1;
        c->out_off += w;
    }
    c->out_len = c->out_off = 0;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s PORT MEGABYTES [SEED]\n", argv[0]); return 2; }
    int port = atoi(argv[1]);
    double mb = strtod(argv[2], 0);
    uint64_t seed = argc > 3 ? strtoull(argv[3], 0, 10) : 42;
    uint32_t nblocks = (uint32_t)(mb * 1024 * 1024 / BLOCK);
    if (nblocks == 0) nblocks = 1;
    uint64_t *data = malloc((size_t)nblocks * BLOCK);
    if (!data) { perror("malloc"); return 1; }
    for (size_t i = 0; i < (size_t)nblocks * BLOCK / 8; i++) data[i] = mix(seed + (i + 1) * 0x9e3779b97f4a7c15ULL);
    if (port == 0) {
        printf("ready %u\n", nblocks);
        fflush(stdout);
        int null = open("/dev/null", O_RDWR);
        for (int fd = 0; fd < 3; fd++) dup2(null, fd);
        if (null > 2) close(null);
        for (;;) pause();
    }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(ls, (void *)&a, sizeof a) || listen(ls, 128)) { perror("listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = MAXC};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("listening %u\n", nblocks);
    fflush(stdout);
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            uint32_t k = evs[i].data.u32;
            if (k == MAXC) {
                for (;;) {
                    int fd = accept4(ls, 0, 0, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    int slot = -1;
                    for (int j = 0; j < MAXC; j++) if (!conns[j].fd) { slot = j; break; }
                    if (slot < 0) { close(fd); continue; }
                    memset(&conns[slot], 0, sizeof conns[slot]);
                    conns[slot].fd = fd;
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.u32 = slot};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
                }
                continue;
            }
            struct conn *c = &conns[k];
            int dead = flush_out(c) < 0;
            while (!dead && c->out_len == 0) {
                size_t want = c->have && c->in[0] == 'R' ? 5 : 1;
                ssize_t r = read(c->fd, c->in + c->have, want - c->have);
                if (r < 0 && errno == EINTR) continue;
                if (r < 0 && errno == EAGAIN) break;
                if (r <= 0) { dead = 1; break; }
                c->have += r;
                if (c->in[0] != 'R') { dead = 1; break; } /* 'Q' or garbage */
                if (c->have < 5) continue;
                uint32_t b;
                memcpy(&b, c->in + 1, 4);
                memcpy(c->out, (unsigned char *)data + (size_t)(b % nblocks) * BLOCK, BLOCK);
                c->out_len = BLOCK;
                c->have = 0;
                if (flush_out(c) < 0) dead = 1;
            }
            if (dead) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, 0);
                close(c->fd);
                memset(c, 0, sizeof *c);
            }
        }
    }
}
