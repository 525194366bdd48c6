/* Shared anonymous memory inherited across fork (one object, two processes), written by both
 * before the dump and after the restore: each sees the other's writes (also those of a second
 * thread of the child, which keeps counting). A private page stays private (copy-on-write).
 * The child's parent-death signal (as every postgres child has) follows its restored parent. */
#include "fidelity.h"
#include <sys/mman.h>
#include <pthread.h>
#include <sys/wait.h>
#include <sys/prctl.h>

static volatile int *shm;

static void *count(void *a) {
    (void)a;
    for (int i = 0; i < 60000 && shm[5] == 0; i++) {
        shm[4]++;
        msleep(1);
    }
    return NULL;
}

int main(void) {
    fid_init();
    shm = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    volatile int *priv = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED || priv == MAP_FAILED) { printf("FAIL mmap\n"); return 1; }
    shm[0] = 11;
    shm[1024 * 3] = 12; /* last page */
    priv[0] = 1;
    pid_t c = fork();
    if (c == 0) {
        prctl(PR_SET_PDEATHSIG, SIGUSR2, 0, 0, 0);
        pthread_t t;
        pthread_create(&t, NULL, count, NULL);
        priv[0] = 2;
        shm[1] = 22;
        for (int i = 0; i < 30000 && shm[2] != 33; i++) msleep(1);
        int sig = 0;
        prctl(PR_GET_PDEATHSIG, &sig, 0, 0, 0);
        int ok = shm[2] == 33 && shm[0] == 11 && shm[1024 * 3] == 12 && priv[0] == 2 && sig == SIGUSR2;
        shm[3] = ok ? 44 : 45;
        for (int i = 0; i < 30000 && shm[5] == 0; i++) msleep(1);
        pthread_join(t, NULL);
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
    int n0 = shm[4];
    for (int i = 0; i < 10000 && shm[4] < n0 + 5; i++) msleep(1);
    CHECK(shm[4] >= n0 + 5, "the child's thread does not count: %d", shm[4]);
    shm[5] = 1;
    int st = 0;
    CHECK(waitpid(c, &st, 0) == c, "child not ours");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    return finish();
}
