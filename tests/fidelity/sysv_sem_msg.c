/* SysV semaphores and message queues are carried: a private semaphore set (values set, a semop
 * done) and a keyed message queue (messages of several types, one of them empty, one with NUL
 * bytes, after one sent and received back), then msg_qbytes lowered below what is queued and
 * both given to other owners. After the restore the values, the mode and owner, the size limit
 * and every message are checked byte for byte and in order, and both still work (semop, msgsnd,
 * msgrcv). With the file "late" in its directory the driver has sent one more message (type 9,
 * "late") to the queue while it was dumped, msg_qbytes raised to 12000 first: the live queue must
 * have been used as it was, not written from the image. The program removes both at the end. */
#include "fidelity.h"
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>

struct msg { long type; char text[2048]; };

static const long types[] = {3, 1, 2, 3, 5};
static const char *texts[] = {"first of type 3", "", "bin\0ary\0", "second of type 3", NULL};
static const size_t lens[] = {15, 0, 8, 16, 1500};

static void fill_big(char *t) {
    for (int i = 0; i < 1500; i++) t[i] = (char)(i * 7 + 1);
}

int main(void) {
    fid_init();
    key_t qkey = ftok(".", 'q');
    int sem = semget(IPC_PRIVATE, 3, IPC_CREAT | 0640);
    int msq = msgget(qkey, IPC_CREAT | IPC_EXCL | 0620);
    unsigned short vals[3] = {7, 0, 32767};
    struct sembuf op = {.sem_num = 1, .sem_op = 5, .sem_flg = 0};
    struct msqid_ds qd;
    if (qkey == -1 || sem < 0 || msq < 0 || semctl(sem, 0, SETALL, vals) || semop(sem, &op, 1) ||
        msgctl(msq, IPC_STAT, &qd)) {
        printf("FAIL setup: %s\n", strerror(errno));
        return 2;
    }
    qd.msg_qbytes = 12000; /* lowered: raising it past msgmnb needs CAP_SYS_RESOURCE */
    if (msgctl(msq, IPC_SET, &qd)) { printf("FAIL IPC_SET: %s\n", strerror(errno)); return 2; }
    /* A type-7 message first, received back (the queue's lrpid is this process too). */
    struct msg m = {7, "taken"};
    if (msgsnd(msq, &m, 5, 0) || msgrcv(msq, &m, sizeof m.text, 7, IPC_NOWAIT) != 5) {
        printf("FAIL first message: %s\n", strerror(errno));
        return 2;
    }
    for (int i = 0; i < 5; i++) {
        m.type = types[i];
        if (texts[i]) memcpy(m.text, texts[i], lens[i]); else fill_big(m.text);
        if (msgsnd(msq, &m, lens[i], 0)) { printf("FAIL msgsnd %d: %s\n", i, strerror(errno)); return 2; }
    }
    /* Lowered below what is queued (1539 bytes): allowed, nothing is dropped. Both objects are
     * given to another owner (root still uses them: CAP_IPC_OWNER). */
    qd.msg_qbytes = 1500;
    qd.msg_perm.uid = 65534;
    qd.msg_perm.gid = 65533;
    struct semid_ds sd;
    int set = msgctl(msq, IPC_SET, &qd) || semctl(sem, 0, IPC_STAT, &sd);
    sd.sem_perm.uid = 65533;
    sd.sem_perm.gid = 65534;
    if (set || semctl(sem, 0, IPC_SET, &sd)) { printf("FAIL IPC_SET: %s\n", strerror(errno)); return 2; }
    printf("sem %d msg %d key %d\n", sem, msq, (int)qkey);
    ready();
    wait_go();
    int late = access("late", F_OK) == 0;

    unsigned short got[3] = {0};
    CHECK(semctl(sem, 0, GETALL, got) == 0 && got[0] == 7 && got[1] == 5 && got[2] == 32767,
          "semaphore values %u %u %u", got[0], got[1], got[2]);
    CHECK(semctl(sem, 0, IPC_STAT, &sd) == 0 && sd.sem_nsems == 3 && (sd.sem_perm.mode & 0777) == 0640 &&
              sd.sem_perm.uid == 65533 && sd.sem_perm.gid == 65534,
          "semaphore set: nsems %lu mode %o", (unsigned long)sd.sem_nsems, sd.sem_perm.mode & 0777);
    CHECK(msgctl(msq, IPC_STAT, &qd) == 0 && qd.msg_qnum == 5 + late && qd.msg_qbytes == (late ? 12000 : 1500) &&
              (qd.msg_perm.mode & 0777) == 0620 && qd.msg_perm.__key == qkey && qd.msg_perm.uid == 65534 &&
              qd.msg_perm.gid == 65533,
          "queue: qnum %lu qbytes %lu mode %o key %#x", (unsigned long)qd.msg_qnum, (unsigned long)qd.msg_qbytes,
          qd.msg_perm.mode & 0777, qd.msg_perm.__key);
    char big[1500];
    fill_big(big);
    for (int i = 0; i < 5; i++) {
        memset(&m, 0xee, sizeof m);
        ssize_t n = msgrcv(msq, &m, sizeof m.text, 0, IPC_NOWAIT);
        CHECK(n == (ssize_t)lens[i] && m.type == types[i] && !memcmp(m.text, texts[i] ? texts[i] : big, lens[i]),
              "message %d: %zd bytes, type %ld", i, n, m.type);
    }
    if (late) {
        ssize_t n = msgrcv(msq, &m, sizeof m.text, 0, IPC_NOWAIT);
        CHECK(n == 4 && m.type == 9 && !memcmp(m.text, "late", 4), "the late message: %zd bytes", n);
    }
    CHECK(msgrcv(msq, &m, sizeof m.text, 0, IPC_NOWAIT) == -1 && errno == ENOMSG, "more messages than sent");

    /* Both still work. */
    struct sembuf down = {.sem_num = 1, .sem_op = -5, .sem_flg = IPC_NOWAIT};
    CHECK(semop(sem, &down, 1) == 0 && semctl(sem, 1, GETVAL) == 0, "semop after: %s", strerror(errno));
    CHECK(semop(sem, &down, 1) == -1 && errno == EAGAIN, "semaphore went below 0");
    m.type = 4;
    memcpy(m.text, "again", 5);
    CHECK(msgsnd(msq, &m, 5, IPC_NOWAIT) == 0, "msgsnd after: %s", strerror(errno));
    CHECK(msgrcv(msq, &m, sizeof m.text, 4, IPC_NOWAIT) == 5 && !memcmp(m.text, "again", 5), "msgrcv after");
    semctl(sem, 0, IPC_RMID);
    msgctl(msq, IPC_RMID, NULL);
    return finish();
}
