/* Scheduling attributes: CPU affinity and nice value of the main thread and of another thread
 * (both per thread in the kernel), and oom_score_adj. */
#include "fidelity.h"
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>

static volatile int stop, started;
static char err[128];
static int last_cpu;

static void *worker(void *a) {
    (void)a;
    cpu_set_t s; CPU_ZERO(&s); CPU_SET(last_cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
    setpriority(PRIO_PROCESS, gettid(), 7);
    started = 1;
    while (!stop) msleep(1);
    cpu_set_t q; sched_getaffinity(0, sizeof q, &q);
    if (!CPU_ISSET(last_cpu, &q) || CPU_COUNT(&q) != 1) snprintf(err, sizeof err, "worker affinity count %d", CPU_COUNT(&q));
    int n = getpriority(PRIO_PROCESS, gettid());
    if (n != 7 && !err[0]) snprintf(err, sizeof err, "worker nice %d", n);
    return NULL;
}

int main(void) {
    fid_init();
    int ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    last_cpu = ncpu - 1;
    cpu_set_t s; CPU_ZERO(&s); CPU_SET(0, &s);
    sched_setaffinity(0, sizeof s, &s);
    setpriority(PRIO_PROCESS, gettid(), 5);
    FILE *f = fopen("/proc/self/oom_score_adj", "w");
    fprintf(f, "123\n");
    fclose(f);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    while (!started) msleep(1);
    ready();
    wait_go();
    cpu_set_t q; sched_getaffinity(0, sizeof q, &q);
    CHECK(CPU_ISSET(0, &q) && CPU_COUNT(&q) == 1, "main affinity count %d", CPU_COUNT(&q));
    CHECK(getpriority(PRIO_PROCESS, gettid()) == 5, "main nice %d", getpriority(PRIO_PROCESS, gettid()));
    char b[16] = {0};
    f = fopen("/proc/self/oom_score_adj", "r");
    fgets(b, sizeof b, f);
    fclose(f);
    CHECK(atoi(b) == 123, "oom_score_adj %s", b);
    stop = 1;
    pthread_join(t, NULL);
    CHECK(err[0] == 0, "%s", err);
    return finish();
}
