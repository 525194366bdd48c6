/* An fd of a namespace other than the restorer's (a uts namespace of its own, after
 * unshare): refused at dump naming the fd and the namespace; the program runs on. */
#define _GNU_SOURCE
#include "fidelity.h"
#include <sched.h>

int main(void) {
    fid_init();
    if (unshare(CLONE_NEWUTS)) { printf("FAIL unshare: %s\n", strerror(errno)); return 2; }
    int fd = open("/proc/self/ns/uts", O_RDONLY);
    if (fd != 3) { printf("FAIL fd %d\n", fd); return 2; }
    ready();
    wait_go();
    CHECK(fcntl(3, F_GETFD) != -1, "fd 3 is gone");
    return finish();
}
