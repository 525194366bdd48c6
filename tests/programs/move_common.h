/* Shared by the DVS paper's evaluation programs (move_server.c, move_client.c): the seeded
 * generator of the server's data (so a client can model it) and the checksum of a block. */
#ifndef MOVE_COMMON_H
#define MOVE_COMMON_H
#include <stddef.h>
#include <stdint.h>

#define BLOCK 4096

static uint64_t rng;
static uint64_t next64(void) { /* splitmix64 */
    uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static uint64_t fnv(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}
#endif
