/* Threads: three threads besides main, each with its own TLS value, name, signal mask and
 * blocking point (a condition variable, a spin loop, a pipe read), a signal pending on one of
 * them, are restored with their tids
 * (pthread_kill to another thread uses the tid cached in struct pthread), wake up, check their
 * state and are joined (pthread_join waits on the clear_child_tid futex: set_tid_address). */
#include "fidelity.h"
#include <pthread.h>
#include <stdatomic.h>

static __thread long tv;
static pid_t tids[4];
static atomic_int started, stop;
static volatile pid_t handled_by;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int go_flag;
static int pfd[2];
static char errs[4][128];

static void usr1(int s) { (void)s; handled_by = gettid(); }

static long uid0;

static void check_self(int i, const char *name) {
    char n[32] = {0};
    long uid = syscall(SYS_geteuid); /* per-thread credentials, not glibc's view */
    pthread_getname_np(pthread_self(), n, sizeof n);
    if (tv != 1000 + i) snprintf(errs[i], sizeof errs[i], "thread %d: tls %ld", i, tv);
    else if (gettid() != tids[i]) snprintf(errs[i], sizeof errs[i], "thread %d: tid %d, was %d", i, gettid(), tids[i]);
    else if (strcmp(n, name)) snprintf(errs[i], sizeof errs[i], "thread %d: name '%s'", i, n);
    else if (uid != uid0) snprintf(errs[i], sizeof errs[i], "thread %d: euid %ld, process %ld", i, uid, uid0);
}

static void *t1(void *a) {
    (void)a;
    tv = 1001; tids[1] = gettid(); pthread_setname_np(pthread_self(), "cond-waiter");
    pthread_mutex_lock(&mu);
    started++;
    while (!go_flag) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    check_self(1, "cond-waiter");
    return NULL;
}

static void *t2(void *a) {
    (void)a;
    tv = 1002; tids[2] = gettid(); pthread_setname_np(pthread_self(), "spinner");
    sigset_t s; sigemptyset(&s); sigaddset(&s, SIGUSR2); pthread_sigmask(SIG_BLOCK, &s, NULL);
    started++;
    volatile unsigned long x = 0;
    while (!stop) { x++; if ((x & 0xffff) == 0) sched_yield(); }
    check_self(2, "spinner");
    sigset_t now; pthread_sigmask(SIG_BLOCK, NULL, &now);
    if (!sigismember(&now, SIGUSR2) && !errs[2][0]) snprintf(errs[2], sizeof errs[2], "thread 2 lost its mask");
    sigset_t pend; sigpending(&pend);
    if (!sigismember(&pend, SIGUSR2) && !errs[2][0]) snprintf(errs[2], sizeof errs[2], "thread 2 lost its pending SIGUSR2");
    return NULL;
}

static void *t3(void *a) {
    (void)a;
    tv = 1003; tids[3] = gettid(); pthread_setname_np(pthread_self(), "reader");
    started++;
    char c = 0;
    ssize_t n = read(pfd[0], &c, 1);
    if (n != 1 || c != 'x') snprintf(errs[3], sizeof errs[3], "thread 3: read %zd", n);
    else check_self(3, "reader");
    return NULL;
}

int main(void) {
    fid_init();
    tv = 1000; tids[0] = gettid(); uid0 = syscall(SYS_geteuid);
    signal(SIGUSR1, usr1);
    pipe(pfd);
    pthread_t th[4];
    pthread_create(&th[1], NULL, t1, NULL);
    pthread_create(&th[2], NULL, t2, NULL);
    pthread_create(&th[3], NULL, t3, NULL);
    sigset_t s; sigemptyset(&s); sigaddset(&s, SIGUSR1); pthread_sigmask(SIG_BLOCK, &s, NULL); /* only the threads take USR1 */
    while (started < 3) msleep(1);
    msleep(20);
    pthread_kill(th[2], SIGUSR2); /* blocked there: stays pending on that thread */
    ready();
    wait_go();
    CHECK(tv == 1000 && gettid() == tids[0] && getpid() == tids[0], "main: tls %ld tid %d", tv, gettid());
    pthread_kill(th[2], SIGUSR1);
    for (int i = 0; i < 2000 && !handled_by; i++) msleep(1);
    CHECK(handled_by == tids[2], "pthread_kill(t2) handled by %d, t2 is %d", handled_by, tids[2]);
    pthread_mutex_lock(&mu); go_flag = 1; pthread_cond_broadcast(&cv); pthread_mutex_unlock(&mu);
    write(pfd[1], "x", 1);
    stop = 1;
    for (int i = 1; i <= 3; i++) {
        struct timespec dl; clock_gettime(CLOCK_REALTIME, &dl); dl.tv_sec += 10;
        int r = pthread_timedjoin_np(th[i], NULL, &dl);
        CHECK(r == 0, "join thread %d: %s", i, strerror(r));
        CHECK(errs[i][0] == 0, "%s", errs[i]);
    }
    return finish();
}
