/* A semop with SEM_UNDO gives the process undo state the kernel keeps to itself (applied when
 * it ends): the dump is refused by name. The process runs on: the semaphore is still taken,
 * and given back by the undo when it ends (checked through a child that did the same). */
#include "fidelity.h"
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/wait.h>

int main(void) {
    fid_init();
    int sem = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
    struct sembuf take = {.sem_num = 0, .sem_op = 1, .sem_flg = SEM_UNDO};
    if (sem < 0 || semop(sem, &take, 1)) { printf("FAIL setup: %s\n", strerror(errno)); return 2; }
    printf("sem %d\n", sem);
    ready();
    wait_go();
    CHECK(semctl(sem, 0, GETVAL) == 1, "value %d", semctl(sem, 0, GETVAL));
    pid_t c = fork();
    if (c == 0) _exit(semop(sem, &take, 1) ? 1 : 0);
    int st = 0;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child %#x", st);
    CHECK(semctl(sem, 0, GETVAL) == 1, "the child's undo was not applied: %d", semctl(sem, 0, GETVAL));
    semctl(sem, 0, IPC_RMID);
    return finish();
}
