/* The main thread calls pthread_exit while another thread runs on (the thread-group leader is
 * a zombie): not carried yet, so the dump is refused naming it, and the process runs on. */
#include "fidelity.h"
#include <pthread.h>

static void *worker(void *a) {
    (void)a;
    char st[256] = "";
    for (int i = 0; i < 5000 && !strstr(st, "State:\tZ"); i++) { /* until main has exited */
        msleep(1);
        memset(st, 0, sizeof st);
        int fd = open("/proc/self/status", O_RDONLY);
        read(fd, st, sizeof st - 1);
        close(fd);
    }
    if (!strstr(st, "State:\tZ")) { printf("FAIL setup: the main thread did not exit\n"); exit(2); }
    ready();
    wait_go();
    exit(finish());
}

int main(void) {
    fid_init();
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    pthread_exit(NULL);
}
