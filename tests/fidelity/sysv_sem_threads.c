/* A process with a second thread that uses a semaphore set without SEM_UNDO: pthread_create
 * (CLONE_SYSVSEM) gave it an undo list, which cannot be told apart from one made by a SEM_UNDO
 * semop, so the dump is refused by name (the price of the SEM_UNDO rule). The process runs on. */
#include "fidelity.h"
#include <pthread.h>
#include <sys/ipc.h>
#include <sys/sem.h>

static void *idle(void *arg) {
    (void)arg;
    for (int i = 0; i < 30000; i++) msleep(1);
    return NULL;
}

int main(void) {
    fid_init();
    int sem = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
    struct sembuf up = {.sem_num = 0, .sem_op = 1, .sem_flg = 0};
    pthread_t t;
    if (sem < 0 || pthread_create(&t, NULL, idle, NULL) || semop(sem, &up, 1)) {
        printf("FAIL setup: %s\n", strerror(errno));
        return 2;
    }
    pthread_detach(t);
    printf("sem %d\n", sem);
    ready();
    wait_go();
    CHECK(semctl(sem, 0, GETVAL) == 1, "value %d", semctl(sem, 0, GETVAL));
    semctl(sem, 0, IPC_RMID);
    return finish();
}
