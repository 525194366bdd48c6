/* A parent-death signal (PR_SET_PDEATHSIG) cannot follow the process (the restored process has
 * another parent): the dump is refused naming it, after the freeze, and the process runs on
 * with its state as it was. */
#include "fidelity.h"
#include <sys/prctl.h>

int main(void) {
    fid_init();
    prctl(PR_SET_PDEATHSIG, SIGUSR1, 0, 0, 0);
    ready();
    wait_go();
    int sig = 0;
    prctl(PR_GET_PDEATHSIG, &sig, 0, 0, 0);
    CHECK(sig == SIGUSR1, "parent-death signal %d", sig);
    return finish();
}
