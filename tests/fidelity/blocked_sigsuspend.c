/* Frozen in sigsuspend(2) with a temporary mask: it restarts after restore, the driver's SIGUSR1
 * wakes it, and the original mask (SIGUSR1 blocked) is back afterwards. */
#include "fidelity.h"

static volatile int got;
static void h(int s) { (void)s; got++; }

int main(void) {
    fid_init();
    signal(SIGUSR1, h);
    sigset_t block, empty, now;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGUSR2);
    sigprocmask(SIG_BLOCK, &block, NULL);
    sigemptyset(&empty);
    sigaddset(&empty, SIGUSR2);
    printf("READY\n");
    int r = sigsuspend(&empty);
    CHECK(r == -1 && errno == EINTR && got == 1, "sigsuspend %d errno %d got %d", r, errno, got);
    sigprocmask(SIG_BLOCK, NULL, &now);
    CHECK(sigismember(&now, SIGUSR1) && sigismember(&now, SIGUSR2), "mask not restored after sigsuspend");
    return finish();
}
