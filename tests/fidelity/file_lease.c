/* A file lease (F_SETLEASE) is refused by name (leases are not carried); the process keeps it. */
#include "fidelity.h"

int main(void) {
    fid_init();
    close(open("leased", O_RDWR | O_CREAT, 0600));
    int fd = open("leased", O_RDONLY);
    if (fcntl(fd, F_SETLEASE, F_RDLCK)) { printf("FAIL F_SETLEASE: %s\n", strerror(errno)); return 2; }
    ready();
    wait_go();
    CHECK(fcntl(fd, F_GETLEASE) == F_RDLCK, "lease lost");
    return finish();
}
