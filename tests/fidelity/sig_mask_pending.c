/* Blocked mask and pending signals: a standard and a queued real-time signal (with its value)
 * wait, blocked, across the dump and arrive afterwards. */
#include "fidelity.h"

int main(void) {
    fid_init();
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGRTMIN + 2);
    sigaddset(&set, SIGWINCH);
    sigprocmask(SIG_BLOCK, &set, NULL);
    raise(SIGUSR1);
    union sigval v = {.sival_int = 4242};
    sigqueue(getpid(), SIGRTMIN + 2, v);
    v.sival_int = 4343;
    sigqueue(getpid(), SIGRTMIN + 2, v);
    ready();
    wait_go();
    sigset_t cur, pend;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    CHECK(sigismember(&cur, SIGUSR1) && sigismember(&cur, SIGRTMIN + 2) && sigismember(&cur, SIGWINCH), "mask lost");
    CHECK(!sigismember(&cur, SIGUSR2), "extra blocked");
    sigpending(&pend);
    CHECK(sigismember(&pend, SIGUSR1), "SIGUSR1 not pending");
    CHECK(sigismember(&pend, SIGRTMIN + 2), "RT signal not pending");
    siginfo_t si;
    struct timespec z = {0, 0};
    CHECK(sigtimedwait(&set, &si, &z) == SIGUSR1, "SIGUSR1 first");
    CHECK(sigtimedwait(&set, &si, &z) == SIGRTMIN + 2 && si.si_value.sival_int == 4242, "rt 1: %d", si.si_value.sival_int);
    CHECK(sigtimedwait(&set, &si, &z) == SIGRTMIN + 2 && si.si_value.sival_int == 4343, "rt 2: %d", si.si_value.sival_int);
    CHECK(sigtimedwait(&set, &si, &z) == -1, "extra signal");
    return finish();
}
