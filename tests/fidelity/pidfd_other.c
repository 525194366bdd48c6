/* A pidfd of another live process (the parent): the dump is refused naming it; the process
 * runs on. */
#include "fidelity.h"

int main(void) {
    fid_init();
    int fd = syscall(SYS_pidfd_open, getppid(), 0);
    ready();
    wait_go();
    CHECK(fd >= 0 && fcntl(fd, F_GETFD) != -1, "pidfd gone");
    return finish();
}
