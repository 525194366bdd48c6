/* vDSO: clock_gettime/gettimeofday (served by the vDSO, through pointers glibc cached at
 * start-up) agree with the real system call after restore. */
#include "fidelity.h"
#include <sys/time.h>

static int64_t ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }

int main(void) {
    fid_init();
    struct timespec a;
    clock_gettime(CLOCK_MONOTONIC, &a);
    ready();
    while (!go_received()) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); clock_gettime(CLOCK_REALTIME, &t); }
    for (int i = 0; i < 1000; i++) {
        struct timespec v, s;
        clock_gettime(CLOCK_REALTIME, &v);
        syscall(SYS_clock_gettime, CLOCK_REALTIME, &s);
        int64_t d = ns(s) - ns(v);
        if (d < 0 || d > 50000000) { CHECK(0, "realtime vdso vs syscall off by %lld ns", (long long)d); break; }
        clock_gettime(CLOCK_MONOTONIC, &v);
        syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &s);
        d = ns(s) - ns(v);
        if (d < 0 || d > 50000000) { CHECK(0, "monotonic off by %lld ns", (long long)d); break; }
    }
    struct timeval tv; struct timespec s;
    gettimeofday(&tv, NULL);
    syscall(SYS_clock_gettime, CLOCK_REALTIME, &s);
    CHECK(llabs((long long)s.tv_sec - tv.tv_sec) <= 1, "gettimeofday %ld vs %ld", (long)tv.tv_sec, (long)s.tv_sec);
    struct timespec b;
    clock_gettime(CLOCK_MONOTONIC, &b);
    CHECK(ns(b) >= ns(a), "monotonic went back");
    return finish();
}
