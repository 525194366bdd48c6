/* AF_UNIX stream socket pairs with both ends in the process (asyncio's self-pipe, event loops):
 * unread bytes in both directions, an O_NONBLOCK end, a half-closed pair whose reader then
 * sees EOF; the pairs stay connected after restore. */
#include "fidelity.h"
#include <sys/socket.h>

int main(void) {
    fid_init();
    int s[2], t[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, s);
    socketpair(AF_UNIX, SOCK_STREAM, 0, t);
    write(s[0], "hello", 5);
    write(s[0], " world", 6);
    write(s[1], "x", 1);
    fcntl(s[0], F_SETFL, O_NONBLOCK);
    write(t[0], "bye", 3);
    shutdown(t[0], SHUT_WR);
    ready();
    wait_go();
    char b[32] = {0};
    CHECK(read(s[1], b, sizeof b) == 11 && strcmp(b, "hello world") == 0, "s[1] read '%s'", b);
    memset(b, 0, sizeof b);
    CHECK(read(s[0], b, sizeof b) == 1 && b[0] == 'x', "s[0] read '%s'", b);
    CHECK(fcntl(s[0], F_GETFL) & O_NONBLOCK, "lost O_NONBLOCK");
    CHECK(read(s[0], b, 1) == -1 && errno == EAGAIN, "extra data");
    CHECK(write(s[1], "more", 4) == 4, "write");
    memset(b, 0, sizeof b);
    CHECK(read(s[0], b, sizeof b) == 4 && strcmp(b, "more") == 0, "pair not connected: '%s'", b);
    memset(b, 0, sizeof b);
    CHECK(read(t[1], b, sizeof b) == 3 && strcmp(b, "bye") == 0, "t[1] '%s'", b);
    CHECK(read(t[1], b, sizeof b) == 0, "no EOF after the peer's shutdown");
    return finish();
}
