/* A real TCP socket: the dump is refused (naming the fd and AF_INET); the process runs on. */
#include "fidelity.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

int main(void) {
    fid_init();
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(s, (struct sockaddr *)&a, sizeof a);
    listen(s, 1);
    ready();
    wait_go();
    CHECK(fcntl(s, F_GETFD) != -1, "socket gone");
    return finish();
}
