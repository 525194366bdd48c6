/* /dev/null and /dev/zero fds; a pipe with both ends in the process keeps its unread data, its
 * O_NONBLOCK read end and a larger capacity. */
#include "fidelity.h"

int main(void) {
    fid_init();
    int n = open("/dev/null", O_WRONLY);
    dup2(n, 5); close(n);
    int z = open("/dev/zero", O_RDONLY);
    int p[2];
    pipe2(p, O_NONBLOCK);
    fcntl(p[1], F_SETFL, 0);
    fcntl(p[0], F_SETPIPE_SZ, 1 << 18);
    char big[100000];
    for (size_t i = 0; i < sizeof big; i++) big[i] = (char)(i % 251);
    write(p[1], "hello, pipe", 11);
    write(p[1], big, sizeof big);
    ready();
    wait_go();
    CHECK(write(5, "x", 1) == 1, "/dev/null write");
    char zb[8] = {1};
    CHECK(read(z, zb, 8) == 8 && zb[0] == 0, "/dev/zero");
    CHECK(fcntl(p[0], F_GETFL) & O_NONBLOCK, "read end lost O_NONBLOCK");
    CHECK(!(fcntl(p[1], F_GETFL) & O_NONBLOCK), "write end gained O_NONBLOCK");
    CHECK(fcntl(p[0], F_GETPIPE_SZ) >= (1 << 18), "pipe size %d", fcntl(p[0], F_GETPIPE_SZ));
    char got[11];
    CHECK(read(p[0], got, 11) == 11 && memcmp(got, "hello, pipe", 11) == 0, "pipe data");
    static char back[100000];
    size_t have = 0;
    while (have < sizeof back) { ssize_t k = read(p[0], back + have, sizeof back - have); if (k <= 0) break; have += k; }
    CHECK(have == sizeof big && memcmp(back, big, sizeof big) == 0, "pipe bulk data: %zu bytes", have);
    CHECK(read(p[0], got, 1) == -1 && errno == EAGAIN, "extra data in pipe");
    write(p[1], "again", 5);
    CHECK(read(p[0], got, 5) == 5 && memcmp(got, "again", 5) == 0, "pipe still connected");
    return finish();
}
