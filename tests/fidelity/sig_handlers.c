/* Signal handlers: a SA_SIGINFO|SA_RESTART handler with its own mask, an ignored signal and a
 * handler with SA_RESETHAND are all in place after restore and run. */
#include "fidelity.h"

static volatile sig_atomic_t got1, got2, val;
static void h1(int s, siginfo_t *si, void *uc) { (void)uc; got1 = s; val = si->si_value.sival_int; }
static void h2(int s) { got2 = s; }

int main(void) {
    fid_init();
    struct sigaction sa = {0};
    sa.sa_sigaction = h1;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGWINCH);
    sigaction(SIGUSR1, &sa, NULL);
    struct sigaction sb = {0};
    sb.sa_handler = h2;
    sb.sa_flags = SA_RESETHAND;
    sigaction(SIGUSR2, &sb, NULL);
    signal(SIGHUP, SIG_IGN);
    ready();
    wait_go();
    struct sigaction q;
    sigaction(SIGUSR1, NULL, &q);
    CHECK(q.sa_sigaction == h1, "SIGUSR1 handler lost");
    CHECK((q.sa_flags & (SA_SIGINFO | SA_RESTART)) == (SA_SIGINFO | SA_RESTART), "flags %#x", q.sa_flags);
    CHECK(sigismember(&q.sa_mask, SIGWINCH), "sa_mask lost");
    union sigval v = {.sival_int = 77};
    sigqueue(getpid(), SIGUSR1, v);
    CHECK(got1 == SIGUSR1 && val == 77, "handler: got %d val %d", got1, val);
    raise(SIGUSR2);
    CHECK(got2 == SIGUSR2, "SIGUSR2 handler");
    sigaction(SIGUSR2, NULL, &q);
    CHECK(q.sa_handler == SIG_DFL, "SA_RESETHAND not applied");
    sigaction(SIGHUP, NULL, &q);
    CHECK(q.sa_handler == SIG_IGN, "SIGHUP not ignored");
    raise(SIGHUP);
    return finish();
}
