/* SysV shared memory attached by parent and child: segment 1 removed (IPC_RMID) while attached
 * — it must be made again, once —, segment 2 still there (found again as it is); the child has a
 * second attachment of segment 1 of its own. After the restore each segment is one object:
 * writes by either are seen by the other, and the attachment counts are the same as before. */
#include "fidelity.h"
#include <sys/shm.h>
#include <sys/wait.h>

static int nattch(int id) {
    struct shmid_ds d;
    return shmctl(id, IPC_STAT, &d) == 0 ? (int)d.shm_nattch : -1;
}

int main(void) {
    fid_init();
    int id1 = shmget(IPC_PRIVATE, 8192, IPC_CREAT | 0600), id2 = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    volatile char *s1 = shmat(id1, NULL, 0), *s2 = shmat(id2, NULL, 0);
    if (id1 < 0 || id2 < 0 || s1 == (void *)-1 || s2 == (void *)-1) { printf("FAIL shm\n"); return 1; }
    s1[0] = 'p';
    s2[0] = 'q';
    pid_t c = fork();
    if (c == 0) {
        volatile char *again = shmat(id1, NULL, 0);
        s1[1] = 'c';
        for (int i = 0; i < 30000 && s1[2] != 'g'; i++) msleep(1);
        int ok = again != (void *)-1 && s1[2] == 'g' && again[2] == 'g' && s2[1] == 'x';
        again[3] = ok ? 'y' : 'n';
        s2[2] = 'z';
        _exit(ok ? 0 : 1);
    }
    for (int i = 0; i < 10000 && s1[1] != 'c'; i++) msleep(1);
    shmctl(id1, IPC_RMID, NULL);
    int n1 = nattch(id1), n2 = nattch(id2);
    CHECK(n1 == 3 && n2 == 2, "attachments before: %d %d", n1, n2);
    ready();
    wait_go();
    CHECK(nattch(id1) == n1 && nattch(id2) == n2, "attachments after: %d %d", nattch(id1), nattch(id2));
    s2[1] = 'x';
    s1[2] = 'g';
    for (int i = 0; i < 10000 && s1[3] == 0; i++) msleep(1);
    CHECK(s1[3] == 'y', "child's checks: %c", s1[3] ? s1[3] : '0');
    CHECK(s2[2] == 'z', "segment 2: child's write not seen");
    int st = 0;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    struct shmid_ds d;
    CHECK(shmctl(id1, IPC_STAT, &d) == 0 && (d.shm_perm.mode & SHM_DEST), "segment 1 no longer marked removed");
    shmctl(id2, IPC_RMID, NULL);
    return finish();
}
