/* eventfd keeps its counter (and semaphore mode); timerfd keeps its clock, interval, remaining
 * time and unread expirations. */
#include "fidelity.h"
#include <sys/eventfd.h>
#include <sys/timerfd.h>

int main(void) {
    fid_init();
    int e = eventfd(0, EFD_NONBLOCK);
    uint64_t v = 5;
    write(e, &v, 8);
    int es = eventfd(3, EFD_SEMAPHORE | EFD_NONBLOCK);
    int t = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec its = {{0, 100000000}, {0, 100000000}};
    timerfd_settime(t, 0, &its, NULL);
    int t2 = timerfd_create(CLOCK_REALTIME, 0);
    struct itimerspec far = {{0, 0}, {1000, 0}};
    timerfd_settime(t2, 0, &far, NULL);
    msleep(250); /* expirations unread (the kernel counts them lazily) */
    ready();
    wait_go();
    uint64_t got = 0;
    CHECK(read(e, &got, 8) == 8 && got == 5, "eventfd %llu", (unsigned long long)got);
    CHECK(read(e, &got, 8) == -1 && errno == EAGAIN, "eventfd not drained");
    CHECK(read(es, &got, 8) == 8 && got == 1, "semaphore eventfd %llu", (unsigned long long)got);
    CHECK(read(t, &got, 8) == 8 && got >= 1, "timerfd ticks %llu", (unsigned long long)got);
    struct itimerspec q;
    timerfd_gettime(t, &q);
    CHECK(q.it_interval.tv_nsec == 100000000 && q.it_interval.tv_sec == 0, "interval");
    msleep(150);
    CHECK(read(t, &got, 8) == 8 && got >= 1, "timerfd stopped firing");
    timerfd_gettime(t2, &q);
    CHECK(q.it_value.tv_sec > 900 && q.it_value.tv_sec <= 1000, "one-shot remaining %ld", (long)q.it_value.tv_sec);
    CHECK(!(fcntl(t2, F_GETFL) & O_NONBLOCK) && (fcntl(t, F_GETFL) & O_NONBLOCK), "timerfd flags");
    return finish();
}
