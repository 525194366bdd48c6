/* Per-process attributes set with prctl or through /proc come back: PR_SET_THP_DISABLE,
 * PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE 0, PR_SET_TIMERSLACK and PR_MCE_KILL (main thread
 * and another thread), /proc/self/loginuid, /proc/self/coredump_filter, PR_SET_MEMORY_MERGE and
 * the store-bypass speculation control where the kernel lets the process set them. */
#include "fidelity.h"
#include <pthread.h>
#include <sys/prctl.h>

static volatile int stop, started;
static unsigned long thread_slack;
static int thread_mce;

static void *worker(void *a) {
    (void)a;
    prctl(PR_SET_TIMERSLACK, 654321, 0, 0, 0);
    prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_LATE, 0, 0); /* per thread, unlike main's */
    started = 1;
    while (!stop) msleep(1);
    thread_slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    thread_mce = prctl(PR_MCE_KILL_GET, 0, 0, 0, 0);
    return NULL;
}

static long read_num(const char *p, int base) {
    char b[64] = "";
    int fd = open(p, O_RDONLY);
    read(fd, b, sizeof b - 1);
    close(fd);
    return strtol(b, NULL, base);
}

static int write_str(const char *p, const char *v) {
    int fd = open(p, O_WRONLY);
    int ok = fd >= 0 && write(fd, v, strlen(v)) == (ssize_t)strlen(v);
    if (fd >= 0) close(fd);
    return ok;
}

int main(void) {
    fid_init();
    if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)) { printf("FAIL setup: thp\n"); return 2; }
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    prctl(PR_SET_TIMERSLACK, 123456, 0, 0, 0);
    prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY, 0, 0);
    int loginuid = write_str("/proc/self/loginuid", "4321"); /* needs audit and CAP_AUDIT_CONTROL */
    write_str("/proc/self/coredump_filter", "0x5");
    int merge = prctl(67 /* PR_SET_MEMORY_MERGE */, 1, 0, 0, 0) == 0;
    long spec = prctl(PR_GET_SPECULATION_CTRL, PR_SPEC_STORE_BYPASS, 0, 0, 0);
    int spec_set = spec > 0 && (spec & PR_SPEC_PRCTL) &&
                   prctl(PR_SET_SPECULATION_CTRL, PR_SPEC_STORE_BYPASS, PR_SPEC_DISABLE, 0, 0) == 0;
    spec = prctl(PR_GET_SPECULATION_CTRL, PR_SPEC_STORE_BYPASS, 0, 0, 0);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    for (int i = 0; i < 5000 && !started; i++) msleep(1);
    if (!started) { printf("FAIL setup: the thread did not start\n"); return 2; }
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    ready();
    wait_go();
    stop = 1;
    pthread_join(t, NULL);
    CHECK(prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1, "THP disable lost");
    int reaper = 0;
    prctl(PR_GET_CHILD_SUBREAPER, &reaper, 0, 0, 0);
    CHECK(reaper == 1, "child subreaper lost");
    CHECK(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0, "dumpable came back as %d", prctl(PR_GET_DUMPABLE, 0, 0, 0, 0));
    CHECK(prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0) == 123456, "timer slack %d", prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0));
    CHECK(thread_slack == 654321, "thread timer slack %lu", thread_slack);
    CHECK(prctl(PR_MCE_KILL_GET, 0, 0, 0, 0) == PR_MCE_KILL_EARLY, "mce kill policy");
    CHECK(thread_mce == PR_MCE_KILL_LATE, "thread's mce kill policy %d", thread_mce);
    if (loginuid) CHECK(read_num("/proc/self/loginuid", 10) == 4321, "loginuid %ld", read_num("/proc/self/loginuid", 10));
    CHECK(read_num("/proc/self/coredump_filter", 16) == 5, "coredump_filter %lx", read_num("/proc/self/coredump_filter", 16));
    if (merge) CHECK(prctl(68 /* PR_GET_MEMORY_MERGE */, 0, 0, 0, 0) == 1, "memory merge lost");
    if (spec_set) CHECK(prctl(PR_GET_SPECULATION_CTRL, PR_SPEC_STORE_BYPASS, 0, 0, 0) == spec, "speculation control");
    return finish();
}
