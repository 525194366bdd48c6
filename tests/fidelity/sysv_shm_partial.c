/* A SysV segment attached only in part (its last page unmapped) is refused by name: the
 * rest of the segment could not be put back. The process runs on; it removes the segment. */
#include "fidelity.h"
#include <sys/mman.h>
#include <sys/shm.h>

int main(void) {
    fid_init();
    int id = shmget(IPC_PRIVATE, 3 * 4096, IPC_CREAT | 0600);
    unsigned char *p = shmat(id, NULL, 0);
    if (id < 0 || p == (void *)-1) { printf("FAIL shm: %s\n", strerror(errno)); return 2; }
    shmctl(id, IPC_RMID, NULL);
    p[0] = 42;
    munmap(p + 2 * 4096, 4096);
    ready();
    wait_go();
    CHECK(p[0] == 42, "contents");
    return finish();
}
