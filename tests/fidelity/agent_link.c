/* An fd left to the caller (the dvk agent link): the program is connected to the driver's
 * AF_UNIX socket; the dump records that fd as external, the restore installs the driver's
 * replacement at the same number; the program, frozen in read() on it, gets "ping" from the new
 * peer and answers "pong". */
#include "fidelity.h"
#include <sys/socket.h>
#include <sys/un.h>

int main(void) {
    fid_init();
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, "agent.sock");
    if (connect(s, (struct sockaddr *)&a, sizeof a)) { printf("FAIL connect: %s\n", strerror(errno)); return 1; }
    int link = dup2(s, 9);
    close(s);
    printf("READY fd=%d\n", link);
    char buf[8] = {0};
    ssize_t n = read(link, buf, 4);
    CHECK(n == 4 && memcmp(buf, "ping", 4) == 0, "read %zd '%s'", n, buf);
    CHECK(write(link, "pong", 4) == 4, "write");
    CHECK(!(fcntl(link, F_GETFD) & FD_CLOEXEC), "fd 9 gained FD_CLOEXEC");
    return finish();
}
