/* signalfd: two signalfds (one non-blocking and close-on-exec, one plain) with their masks; a
 * standard and a queued real-time signal (with its value) pending in the process are read
 * through the signalfd after restore, then nothing more. */
#include "fidelity.h"
#include <sys/signalfd.h>

static unsigned long long fdinfo_mask(int fd) {
    char p[64], line[256];
    unsigned long long m = 0;
    snprintf(p, sizeof p, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(p, "r");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "sigmask: %llx", &m) == 1) break;
    if (f) fclose(f);
    return m;
}

int main(void) {
    fid_init();
    sigset_t m, m2;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    sigaddset(&m, SIGRTMIN + 3);
    sigprocmask(SIG_BLOCK, &m, NULL);
    int a = signalfd(-1, &m, SFD_NONBLOCK | SFD_CLOEXEC);
    sigemptyset(&m2);
    sigaddset(&m2, SIGUSR2);
    sigprocmask(SIG_BLOCK, &m2, NULL);
    int b = signalfd(-1, &m2, 0);
    unsigned long long ma = fdinfo_mask(a), mb = fdinfo_mask(b);
    raise(SIGUSR1);
    union sigval v = {.sival_int = 4242};
    sigqueue(getpid(), SIGRTMIN + 3, v);
    ready();
    wait_go();
    CHECK(fdinfo_mask(a) == ma && fdinfo_mask(b) == mb, "masks %llx %llx, were %llx %llx", fdinfo_mask(a),
          fdinfo_mask(b), ma, mb);
    CHECK((fcntl(a, F_GETFL) & O_NONBLOCK) && !(fcntl(b, F_GETFL) & O_NONBLOCK), "O_NONBLOCK");
    CHECK((fcntl(a, F_GETFD) & FD_CLOEXEC) && !(fcntl(b, F_GETFD) & FD_CLOEXEC), "FD_CLOEXEC");
    struct signalfd_siginfo si[4];
    ssize_t n = read(a, si, sizeof si);
    CHECK(n == 2 * (ssize_t)sizeof si[0], "read %zd bytes (%s)", n, strerror(errno));
    if (n == 2 * (ssize_t)sizeof si[0]) {
        CHECK(si[0].ssi_signo == SIGUSR1, "first signal %u", si[0].ssi_signo);
        CHECK(si[1].ssi_signo == (unsigned)SIGRTMIN + 3 && si[1].ssi_int == 4242, "second %u value %d",
              si[1].ssi_signo, si[1].ssi_int);
    }
    CHECK(read(a, si, sizeof si) == -1 && errno == EAGAIN, "more signals");
    /* The plain one still reads what it is for. */
    raise(SIGUSR2);
    CHECK(read(b, si, sizeof si) == sizeof si[0] && si[0].ssi_signo == SIGUSR2, "SIGUSR2 through the second");
    return finish();
}
