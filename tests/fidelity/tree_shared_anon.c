/* Shared anonymous memory inherited across fork (one object, two processes), written by both
 * before the dump and after the restore: each sees the other's writes. A private page stays
 * private (copy-on-write). */
#include "fidelity.h"
#include <sys/mman.h>
#include <sys/wait.h>

int main(void) {
    fid_init();
    volatile int *shm = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    volatile int *priv = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED || priv == MAP_FAILED) { printf("FAIL mmap\n"); return 1; }
    shm[0] = 11;
    shm[1024 * 3] = 12; /* last page */
    priv[0] = 1;
    pid_t c = fork();
    if (c == 0) {
        priv[0] = 2;
        shm[1] = 22;
        for (int i = 0; i < 30000 && shm[2] != 33; i++) msleep(1);
        int ok = shm[2] == 33 && shm[0] == 11 && shm[1024 * 3] == 12 && priv[0] == 2;
        shm[3] = ok ? 44 : 45;
        _exit(ok ? 0 : 1);
    }
    for (int i = 0; i < 10000 && shm[1] != 22; i++) msleep(1);
    CHECK(shm[1] == 22, "child did not write before the dump");
    ready();
    wait_go();
    shm[2] = 33;
    for (int i = 0; i < 10000 && shm[3] == 0; i++) msleep(1);
    CHECK(shm[3] == 44, "child's write after the restore not seen (%d)", shm[3]);
    CHECK(priv[0] == 1, "private page changed: %d", priv[0]);
    int st = 0;
    CHECK(waitpid(c, &st, 0) == c, "child not ours");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    return finish();
}
