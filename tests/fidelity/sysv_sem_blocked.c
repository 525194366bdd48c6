/* Frozen while waiting in semop (semaphore 0 is 0), the set removed before the restore: the
 * wait goes on on the set made again, and ends when the driver posts the semaphore after the
 * restore, with it taken. semop is never restarted by Linux: after a stop (SIGSTOP, or the
 * dump's freeze) it fails with EINTR, and the program calls it again, as programs must. */
#include "fidelity.h"
#include <sys/ipc.h>
#include <sys/sem.h>

int main(void) {
    fid_init();
    int sem = semget(IPC_PRIVATE, 2, IPC_CREAT | 0600);
    struct sembuf one = {.sem_num = 1, .sem_op = 1};
    if (sem < 0 || semop(sem, &one, 1)) { printf("FAIL setup: %s\n", strerror(errno)); return 2; }
    printf("sem %d msg 0 key 0\n", sem);
    ready();
    struct sembuf take = {.sem_num = 0, .sem_op = -1};
    int r, eintr = 0;
    while ((r = semop(sem, &take, 1)) == -1 && errno == EINTR) eintr++;
    CHECK(r == 0, "semop: %s", strerror(errno));
    printf("semop done after %d EINTR\n", eintr);
    wait_go();
    CHECK(semctl(sem, 0, GETVAL) == 0 && semctl(sem, 1, GETVAL) == 1, "values %d %d", semctl(sem, 0, GETVAL),
          semctl(sem, 1, GETVAL));
    semctl(sem, 0, IPC_RMID);
    return finish();
}
