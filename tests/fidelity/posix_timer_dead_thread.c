/* A SIGEV_THREAD_ID timer aimed at a thread that has exited since: there is no thread to aim it
 * at again, so the dump is refused naming the timer; the process runs on. */
#include "fidelity.h"
#include <pthread.h>

static volatile pid_t tid;
static volatile int done;
static void *worker(void *a) {
    tid = gettid();
    for (int i = 0; i < 5000 && !done; i++) msleep(1);
    return NULL;
}

int main(void) {
    fid_init();
    pthread_t th;
    pthread_create(&th, NULL, worker, NULL);
    for (int i = 0; i < 5000 && !tid; i++) msleep(1);
    struct sigevent ev = {.sigev_notify = SIGEV_THREAD_ID, .sigev_signo = SIGUSR1};
    ev._sigev_un._tid = tid;
    timer_t t;
    if (timer_create(CLOCK_MONOTONIC, &ev, &t)) { printf("FAIL timer_create: %s\n", strerror(errno)); return 1; }
    done = 1;
    pthread_join(th, NULL);
    ready();
    wait_go();
    struct itimerspec q;
    CHECK(timer_gettime(t, &q) == 0, "timer lost");
    return finish();
}
