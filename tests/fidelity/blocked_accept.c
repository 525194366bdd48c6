/* Frozen in accept(2) on an AF_UNIX listener bound to a path: the listener is re-created at the
 * same path and fd, accept restarts and takes the driver's connection. */
#include "fidelity.h"
#include <sys/socket.h>
#include <sys/un.h>

int main(void) {
    fid_init();
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, "sock");
    unlink("sock");
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 8)) { printf("FAIL bind: %s\n", strerror(errno)); return 1; }
    printf("READY\n");
    int c = accept(s, NULL, NULL);
    CHECK(c >= 0, "accept: %s", strerror(errno));
    char buf[8] = {0};
    if (c >= 0) CHECK(read(c, buf, 1) == 1 && buf[0] == 'g', "read from client: %s", buf);
    return finish();
}
