/* SysV semaphores and message queues are refused by name (not carried): a semaphore set the
 * program did the last semop on, a message queue it sent a message to. The process runs on
 * with both; it removes them at the end. */
#include "fidelity.h"
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>

int main(void) {
    fid_init();
    int sem = semget(IPC_PRIVATE, 2, IPC_CREAT | 0600);
    int msq = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
    struct sembuf op = {.sem_num = 1, .sem_op = 3, .sem_flg = 0};
    struct { long type; char text[8]; } m = {1, "hello"};
    if (sem < 0 || msq < 0 || semop(sem, &op, 1) || msgsnd(msq, &m, sizeof m.text, 0)) {
        printf("FAIL setup: %s\n", strerror(errno));
        return 2;
    }
    printf("sem %d msg %d\n", sem, msq);
    ready();
    wait_go();
    CHECK(semctl(sem, 1, GETVAL) == 3, "semaphore value %d", semctl(sem, 1, GETVAL));
    CHECK(msgrcv(msq, &m, sizeof m.text, 1, IPC_NOWAIT) == sizeof m.text && !strcmp(m.text, "hello"), "message lost");
    semctl(sem, 0, IPC_RMID);
    msgctl(msq, IPC_RMID, NULL);
    return finish();
}
