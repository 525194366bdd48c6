/* A pty slave whose master the process has closed: its other end is not in the process, so
 * the dump is refused naming the fd and the pty; the program runs on. */
#include "fidelity.h"

int main(void) {
    fid_init();
    int m = posix_openpt(O_RDWR | O_NOCTTY);
    grantpt(m);
    unlockpt(m);
    int s = open(ptsname(m), O_RDWR | O_NOCTTY);
    close(m);
    if (s != 3) {
        dup2(s, 3);
        close(s);
    }
    ready();
    wait_go();
    CHECK(fcntl(3, F_GETFD) != -1, "fd 3 is gone");
    return finish();
}
