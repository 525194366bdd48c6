/* A second thread: the dump is refused (multi-threaded processes are not supported yet); the
 * process, both threads, runs on. */
#include "fidelity.h"
#include <pthread.h>

static volatile long spins;
static void *run(void *a) { (void)a; for (;;) { spins++; msleep(1); } return NULL; }

int main(void) {
    fid_init();
    pthread_t t;
    pthread_create(&t, NULL, run, NULL);
    ready();
    wait_go();
    long s0 = spins;
    msleep(50);
    CHECK(spins > s0, "thread stopped");
    return finish();
}
