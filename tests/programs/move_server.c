#define _GNU_SOURCE
/* The DVS paper's evaluation server: holds N MB of pseudo-random data (seeded, so a client can
 * model it) and serves 4 KB blocks over any number of connections (epoll, one thread).
 *
 *   request:  'W' u32 block, 4096 bytes   -> store them at block; reply u64 FNV-1a of the stored
 *                                            block, then the 4096 bytes of the NEXT block
 *             'R' u32 block               -> reply the 4096 bytes of block
 *             'Q'                         -> reply "bye\n" and close that connection
 * usage: move_server PORT MEGABYTES [SEED]   prints "listening BLOCKS blocks" once it listens.
 * MEGABYTES (MiB) may be fractional (`dvk-bench move` holds 2.5). PORT 0: no socket at all;
 * prints "ready BLOCKS", points stdio at /dev/null and sleeps (the process of the benchmark's
 * local dump + restore baseline). */
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

#include "move_common.h"

#define MAXC 1024

struct conn { int fd; unsigned char in[1 + 4 + BLOCK]; size_t have; unsigned char *out; size_t out_len, out_off; };
static struct conn conns[MAXC];
static unsigned char *data;
static uint32_t nblocks;

static size_t need(const struct conn *c) {
    if (c->have == 0) return 1;
    switch (c->in[0]) {
    case 'W': return 1 + 4 + BLOCK;
    case 'R': return 1 + 4;
    default: return 1;
    }
}

static void queue(struct conn *c, const void *p, size_t n) {
    c->out = realloc(c->out, c->out_len + n);
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

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
    rng = argc > 3 ? strtoull(argv[3], 0, 10) : 42;
    nblocks = (uint32_t)(mb * 1024 * 1024 / BLOCK);
    if (nblocks == 0) nblocks = 1;
    data = malloc((size_t)nblocks * BLOCK);
    if (!data) { perror("malloc"); return 1; }
    for (size_t i = 0; i < (size_t)nblocks * BLOCK / 8; i++) ((uint64_t *)data)[i] = next64();
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
    printf("listening %u blocks\n", nblocks);
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
            int dead = 0;
            for (;;) {
                size_t want = need(c);
                ssize_t r = read(c->fd, c->in + c->have, want - c->have);
                if (r < 0 && errno == EINTR) continue;
                if (r < 0 && errno == EAGAIN) break;
                if (r <= 0) { dead = 1; break; }
                c->have += r;
                if (c->have < need(c)) continue;
                uint32_t b;
                switch (c->in[0]) {
                case 'W': {
                    memcpy(&b, c->in + 1, 4);
                    b %= nblocks;
                    memcpy(data + (size_t)b * BLOCK, c->in + 5, BLOCK);
                    uint64_t h = fnv(data + (size_t)b * BLOCK, BLOCK);
                    queue(c, &h, 8);
                    queue(c, data + (size_t)((b + 1) % nblocks) * BLOCK, BLOCK);
                    break;
                }
                case 'R':
                    memcpy(&b, c->in + 1, 4);
                    queue(c, data + (size_t)(b % nblocks) * BLOCK, BLOCK);
                    break;
                case 'Q':
                    queue(c, "bye\n", 4);
                    flush_out(c);
                    dead = 1;
                    break;
                default:
                    dead = 1;
                }
                c->have = 0;
                if (dead) break;
            }
            if (!dead && flush_out(c) < 0) dead = 1;
            if (dead) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, 0);
                close(c->fd);
                free(c->out);
                memset(c, 0, sizeof *c);
            }
        }
    }
}
