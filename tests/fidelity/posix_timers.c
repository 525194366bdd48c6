/* POSIX timers with each kind of notification, their ids kept across gaps (deleted timers):
 * 0 SIGEV_NONE (100 s left, 7 s interval), 2 SIGEV_SIGNAL (SIGUSR1 with a value, every 20 ms),
 * 4 SIGEV_THREAD_ID (SIGRTMIN+1 to a worker thread, every 20 ms), 5 disarmed; 1 and 3 deleted.
 * After restore: the same ids answer, with their time left and intervals, and the signals keep
 * coming with the timer id and value, to the right thread. */
#include "fidelity.h"
#include <pthread.h>

static volatile int sig_count, thr_count, sig_timerid = -1, sig_value, stop;
static volatile pid_t thr_got_tid, worker_tid;

static void on_sig(int s, siginfo_t *si, void *u) {
    sig_count++;
    sig_timerid = si->si_timerid;
    sig_value = si->si_value.sival_int;
}
static void on_thr(int s, siginfo_t *si, void *u) {
    thr_count++;
    thr_got_tid = gettid();
}
static void *worker(void *a) {
    worker_tid = gettid();
    for (int i = 0; i < 60000 && !stop; i++) msleep(1);
    return NULL;
}

static timer_t make(int notify, int sig, int val, pid_t tid, clockid_t clk) {
    struct sigevent ev = {.sigev_notify = notify, .sigev_signo = sig};
    ev.sigev_value.sival_int = val;
    ev._sigev_un._tid = tid;
    timer_t t = 0;
    if (timer_create(clk, &ev, &t)) printf("timer_create: %s\n", strerror(errno));
    return t;
}
static void arm(timer_t t, long vs, long vns, long is, long ins) {
    struct itimerspec its = {{is, ins}, {vs, vns}};
    timer_settime(t, 0, &its, NULL);
}
#define ID(t) ((long)(intptr_t)(t))

int main(void) {
    fid_init();
    struct sigaction sa = {.sa_sigaction = on_sig, .sa_flags = SA_SIGINFO | SA_RESTART};
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_sigaction = on_thr;
    sigaction(SIGRTMIN + 1, &sa, NULL);
    pthread_t th;
    pthread_create(&th, NULL, worker, NULL);
    for (int i = 0; i < 5000 && !worker_tid; i++) msleep(1);
    timer_t none = make(SIGEV_NONE, 0, 0, 0, CLOCK_MONOTONIC);
    timer_t d1 = make(SIGEV_NONE, 0, 0, 0, CLOCK_MONOTONIC);
    timer_t sig = make(SIGEV_SIGNAL, SIGUSR1, 0x5151, 0, CLOCK_BOOTTIME);
    timer_t d2 = make(SIGEV_NONE, 0, 0, 0, CLOCK_MONOTONIC);
    timer_t thr = make(SIGEV_THREAD_ID, SIGRTMIN + 1, 0, worker_tid, CLOCK_MONOTONIC);
    timer_t off = make(SIGEV_SIGNAL, SIGUSR1, 0, 0, CLOCK_REALTIME);
    timer_delete(d1);
    timer_delete(d2);
    if (ID(none) != 0 || ID(sig) != 2 || ID(thr) != 4 || ID(off) != 5) {
        printf("FAIL setup ids %ld %ld %ld %ld\n", ID(none), ID(sig), ID(thr), ID(off));
        return 1;
    }
    arm(none, 100, 0, 7, 0);
    arm(sig, 0, 20000000, 0, 20000000);
    arm(thr, 0, 20000000, 0, 20000000);
    ready();
    wait_go();
    struct itimerspec q;
    CHECK(timer_gettime(none, &q) == 0 && q.it_value.tv_sec >= 50 && q.it_value.tv_sec < 100 &&
              q.it_interval.tv_sec == 7 && q.it_interval.tv_nsec == 0,
          "SIGEV_NONE timer: %ld s left, interval %ld", (long)q.it_value.tv_sec, (long)q.it_interval.tv_sec);
    CHECK(timer_gettime(off, &q) == 0 && q.it_value.tv_sec == 0 && q.it_value.tv_nsec == 0, "disarmed timer");
    CHECK(timer_gettime(sig, &q) == 0 && q.it_interval.tv_sec == 0 && q.it_interval.tv_nsec == 20000000,
          "SIGEV_SIGNAL interval %ld ns", q.it_interval.tv_nsec);
    CHECK(timer_gettime(thr, &q) == 0 && q.it_interval.tv_nsec == 20000000, "SIGEV_THREAD_ID interval");
    CHECK(timer_gettime(d1, &q) == -1 && errno == EINVAL, "deleted timer 1 exists");
    CHECK(timer_gettime(d2, &q) == -1 && errno == EINVAL, "deleted timer 3 exists");
    sig_count = 0;
    thr_count = 0;
    thr_got_tid = 0;
    for (int i = 0; i < 5000 && (sig_count < 3 || thr_count < 3); i++) msleep(1);
    CHECK(sig_count >= 3 && thr_count >= 3, "expiries after restore: %d signal, %d thread", sig_count, thr_count);
    CHECK(sig_timerid == 2 && sig_value == 0x5151, "si_timerid %d si_value %x", sig_timerid, sig_value);
    CHECK(thr_got_tid == worker_tid, "SIGEV_THREAD_ID signal went to %d, not %d", thr_got_tid, worker_tid);
    stop = 1;
    pthread_join(th, NULL);
    return finish();
}
