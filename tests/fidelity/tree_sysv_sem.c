/* A semaphore set and a message queue used by parent and child: the parent did the last semop
 * on semaphore 0 and the last send, the child the last semop on semaphore 1 and the last
 * receive; both members are seen using them and each is carried once. After the restore the
 * values and the two queued messages are checked, and parent and child still meet through them:
 * the parent posts semaphore 2, which the child waits for, and each takes one message. */
#include "fidelity.h"
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/wait.h>

struct msg { long type; char text[32]; };

static int msg_is(struct msg *m, ssize_t n, long type, const char *text) {
    return n == (ssize_t)strlen(text) && m->type == type && !memcmp(m->text, text, n);
}

int main(void) {
    fid_init();
    int sem = semget(IPC_PRIVATE, 3, IPC_CREAT | 0600);
    int msq = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
    if (sem < 0 || msq < 0) { printf("FAIL setup: %s\n", strerror(errno)); return 2; }
    struct msg m = {1, "to child"};
    if (msgsnd(msq, &m, 8, 0)) { printf("FAIL msgsnd: %s\n", strerror(errno)); return 2; }
    pid_t c = fork();
    if (c == 0) {
        struct sembuf up = {.sem_num = 1, .sem_op = 2}, wait2 = {.sem_num = 2, .sem_op = -1, .sem_flg = IPC_NOWAIT};
        struct msg r;
        int ok = msg_is(&r, msgrcv(msq, &r, sizeof r.text, 1, 0), 1, "to child");
        r.type = 2;
        memcpy(r.text, "from child", 10);
        ok = ok && msgsnd(msq, &r, 10, 0) == 0 && semop(sem, &up, 1) == 0;
        int i = 0;
        while (semop(sem, &wait2, 1) && i++ < 30000) msleep(1); /* posted after the restore */
        ok = ok && i <= 30000 && semctl(sem, 1, GETVAL) == 2;
        ok = ok && msg_is(&r, msgrcv(msq, &r, sizeof r.text, 2, IPC_NOWAIT), 2, "from child");
        _exit(ok ? 0 : 1);
    }
    for (int i = 0; i < 10000 && semctl(sem, 1, GETVAL) != 2; i++) msleep(1);
    struct sembuf up0 = {.sem_num = 0, .sem_op = 1};
    m.type = 3;
    memcpy(m.text, "from parent", 11);
    if (semctl(sem, 1, GETVAL) != 2 || semop(sem, &up0, 1) || msgsnd(msq, &m, 11, 0)) {
        printf("FAIL child did not start: %s\n", strerror(errno));
        return 2;
    }
    printf("sem %d msg %d key 0\n", sem, msq);
    ready();
    wait_go();
    unsigned short v[3] = {9, 9, 9};
    CHECK(semctl(sem, 0, GETALL, v) == 0 && v[0] == 1 && v[1] == 2 && v[2] == 0, "values %u %u %u", v[0], v[1], v[2]);
    struct msqid_ds d;
    CHECK(msgctl(msq, IPC_STAT, &d) == 0 && d.msg_qnum == 2, "%lu messages", (unsigned long)d.msg_qnum);
    CHECK(msg_is(&m, msgrcv(msq, &m, sizeof m.text, 3, IPC_NOWAIT), 3, "from parent"), "parent's message");
    struct sembuf post = {.sem_num = 2, .sem_op = 1};
    CHECK(semop(sem, &post, 1) == 0, "post: %s", strerror(errno));
    int st = 0;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    CHECK(msgctl(msq, IPC_STAT, &d) == 0 && d.msg_qnum == 0, "%lu messages left", (unsigned long)d.msg_qnum);
    semctl(sem, 0, IPC_RMID);
    msgctl(msq, IPC_RMID, NULL);
    return finish();
}
