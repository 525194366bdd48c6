/* A SIGTRAP handler survives the dump (whose int3 must not reset it: the kernel forces a blocked
 * SIGTRAP back to SIG_DFL) and runs after restore. */
#include "fidelity.h"

static volatile int got;
static void h(int s) { (void)s; got++; }

int main(void) {
    fid_init();
    signal(SIGTRAP, h);
    ready();
    wait_go();
    struct sigaction q;
    sigaction(SIGTRAP, NULL, &q);
    CHECK(q.sa_handler == h, "SIGTRAP handler lost");
    raise(SIGTRAP);
    CHECK(got == 1, "handler not called");
    return finish();
}
