/* Frozen in nanosleep(2): the sleep goes on after restore (EINTR with the remaining time, as
 * after a stop) and lasts at least what was asked. */
#include "fidelity.h"

int main(void) {
    fid_init();
    open_ctl();
    struct timespec t0, t1, req = {1, 500000000}, rem;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    printf("READY\n");
    int eintr = 0;
    while (nanosleep(&req, &rem) == -1) {
        CHECK(errno == EINTR, "nanosleep: %s", strerror(errno));
        if (errno != EINTR) break;
        eintr++;
        req = rem;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double el = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    CHECK(el >= 1.49, "slept only %.3f s", el);
    wait_go();
    return finish();
}
