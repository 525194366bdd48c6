/* Interval timers: ITIMER_REAL keeps firing (handler counts) after restore; ITIMER_PROF and
 * ITIMER_VIRTUAL keep their interval. */
#include "fidelity.h"
#include <sys/time.h>

static volatile int ticks;
static void h(int s) { (void)s; ticks++; }

int main(void) {
    fid_init();
    signal(SIGALRM, h);
    struct itimerval it = {{0, 50000}, {0, 50000}};
    setitimer(ITIMER_REAL, &it, NULL);
    struct itimerval ip = {{7, 0}, {100, 0}};
    setitimer(ITIMER_PROF, &ip, NULL);
    struct itimerval iv = {{9, 0}, {200, 0}};
    setitimer(ITIMER_VIRTUAL, &iv, NULL);
    ready();
    wait_go();
    int t0 = ticks;
    msleep(400);
    CHECK(ticks - t0 >= 3, "ITIMER_REAL: %d ticks in 400 ms", ticks - t0);
    struct itimerval q;
    getitimer(ITIMER_REAL, &q);
    CHECK(q.it_interval.tv_usec == 50000 && q.it_interval.tv_sec == 0, "real interval");
    getitimer(ITIMER_PROF, &q);
    CHECK(q.it_interval.tv_sec == 7 && q.it_value.tv_sec > 90, "prof %ld %ld", (long)q.it_interval.tv_sec, (long)q.it_value.tv_sec);
    getitimer(ITIMER_VIRTUAL, &q);
    CHECK(q.it_interval.tv_sec == 9 && q.it_value.tv_sec > 190, "virtual");
    return finish();
}
