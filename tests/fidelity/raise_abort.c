/* glibc's cached TID: raise(), pthread_kill(pthread_self()) and abort() (caught, then left with
 * siglongjmp) work after restore; getpid() and gettid() agree. */
#include "fidelity.h"
#include <pthread.h>
#include <setjmp.h>

static volatile int usr1, abrt;
static sigjmp_buf jb;
static void h(int s) { (void)s; usr1++; }
static void ha(int s) { (void)s; abrt++; siglongjmp(jb, 1); }

int main(void) {
    fid_init();
    signal(SIGUSR1, h);
    signal(SIGABRT, ha);
    ready();
    wait_go();
    CHECK(getpid() == gettid(), "pid %d tid %d", getpid(), gettid());
    CHECK(raise(SIGUSR1) == 0 && usr1 == 1, "raise: %d", usr1);
    CHECK(pthread_kill(pthread_self(), SIGUSR1) == 0 && usr1 == 2, "pthread_kill self: %d", usr1);
    if (sigsetjmp(jb, 1) == 0) abort();
    CHECK(abrt == 1, "abort handler: %d", abrt);
    return finish();
}
