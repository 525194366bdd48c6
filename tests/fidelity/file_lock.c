/* A file lock (flock): the dump is refused naming the fd; the process keeps its lock and runs on. */
#include "fidelity.h"
#include <sys/file.h>

int main(void) {
    fid_init();
    int fd = open("locked", O_RDWR | O_CREAT, 0600);
    flock(fd, LOCK_EX);
    ready();
    wait_go();
    int other = open("locked", O_RDWR);
    CHECK(flock(other, LOCK_EX | LOCK_NB) == -1 && errno == EWOULDBLOCK, "lock lost");
    return finish();
}
