/* A child whose main thread called pthread_exit while another thread runs on: it shows as a
 * zombie ("Z") but is alive. A tree dump must not take it for a zombie (it would come back dead):
 * it is carried like any process whose main thread exited. The child's thread ends the process
 * when told, with the status the parent checks. */
#include "fidelity.h"
#include <pthread.h>
#include <sys/wait.h>

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }

static void *worker(void *a) {
    (void)a;
    for (int i = 0; i < 30000 && !usr1; i++) msleep(1);
    exit(usr1 ? 0 : 1);
}

/* Reads /proc/<c>/status into st until its main thread shows as exited ("Z"), 5 s at most. */
static void wait_leader_zombie(pid_t c, char *st, size_t len) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", c);
    for (int i = 0; i < 5000; i++) {
        memset(st, 0, len);
        int fd = open(path, O_RDONLY);
        read(fd, st, len - 1);
        close(fd);
        if (strstr(st, "State:\tZ")) return;
        msleep(1);
    }
}

int main(void) {
    fid_init();
    signal(SIGUSR1, on_usr1);
    pid_t c = fork();
    if (c == 0) {
        pthread_t t;
        pthread_create(&t, NULL, worker, NULL);
        pthread_exit(NULL);
    }
    char st[512];
    wait_leader_zombie(c, st, sizeof st);
    CHECK(strstr(st, "State:\tZ") != NULL, "the child's main thread did not exit");
    ready();
    wait_go();
    /* The restored leader exits again once the restore lets it go. */
    wait_leader_zombie(c, st, sizeof st);
    CHECK(strstr(st, "State:\tZ") != NULL && strstr(st, "Threads:\t2") != NULL, "the child after the restore: %s", st);
    kill(c, SIGUSR1);
    int s = 0;
    CHECK(waitpid(c, &s, 0) == c && WIFEXITED(s) && WEXITSTATUS(s) == 0, "child: %#x", s);
    return finish();
}
