/* A POSIX timer whose last expiry counted overruns (timer_getoverrun > 0): the count cannot be
 * set again, so the dump is refused naming the timer; the timer keeps its count. */
#include "fidelity.h"

int main(void) {
    fid_init();
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR2);
    sigprocmask(SIG_BLOCK, &m, NULL);
    timer_t t;
    struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGUSR2};
    timer_create(CLOCK_MONOTONIC, &ev, &t);
    struct itimerspec its = {{0, 1000000}, {0, 1000000}};
    timer_settime(t, 0, &its, NULL);
    msleep(30); /* expiries while the signal is blocked: overruns */
    siginfo_t si;
    sigwaitinfo(&m, &si);
    /* (It runs on, its next signal pending and blocked: the count stays that of the last.) */
    int ov = timer_getoverrun(t);
    if (ov <= 0) { printf("FAIL setup: overrun %d\n", ov); return 1; }
    ready();
    wait_go();
    CHECK(timer_getoverrun(t) == ov, "overrun count changed");
    return finish();
}
