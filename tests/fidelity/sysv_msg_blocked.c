/* Frozen while waiting in msgrcv on an empty queue (it sent and took one message before, so it
 * is seen using it), the queue removed before the restore: the wait goes on on the queue made
 * again and ends with the message the driver sends after the restore. */
#include "fidelity.h"
#include <sys/ipc.h>
#include <sys/msg.h>

struct msg { long type; char text[16]; };

int main(void) {
    fid_init();
    int msq = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
    struct msg m = {1, "x"};
    if (msq < 0 || msgsnd(msq, &m, 1, 0) || msgrcv(msq, &m, sizeof m.text, 0, 0) != 1) {
        printf("FAIL setup: %s\n", strerror(errno));
        return 2;
    }
    printf("sem 0 msg %d key 0\n", msq);
    ready();
    ssize_t n;
    int eintr = 0;
    memset(&m, 0, sizeof m);
    while ((n = msgrcv(msq, &m, sizeof m.text, 0, 0)) == -1 && errno == EINTR) eintr++;
    printf("msgrcv done after %d EINTR\n", eintr);
    wait_go();
    CHECK(n == 5 && m.type == 6 && !memcmp(m.text, "after", 5), "msgrcv: %zd bytes, type %ld: %s", n, m.type,
          n < 0 ? strerror(errno) : "");
    msgctl(msq, IPC_RMID, NULL);
    return finish();
}
