/* A POSIX timer (timer_create): the dump is refused naming it; the timer keeps running. */
#include "fidelity.h"

int main(void) {
    fid_init();
    timer_t t;
    struct sigevent ev = {.sigev_notify = SIGEV_NONE};
    timer_create(CLOCK_MONOTONIC, &ev, &t);
    struct itimerspec its = {{0, 0}, {100, 0}};
    timer_settime(t, 0, &its, NULL);
    ready();
    wait_go();
    struct itimerspec q;
    CHECK(timer_gettime(t, &q) == 0 && q.it_value.tv_sec > 50, "timer lost");
    return finish();
}
