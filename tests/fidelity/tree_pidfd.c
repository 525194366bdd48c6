/* pidfds between members: the parent holds pidfds of a live child and of a zombie child, the
 * live child one of its parent. After the restore each still names its process: the parent
 * signals the child through its pidfd, waits for both through them (P_PIDFD), and the child
 * reaches its parent through its own. */
#include "fidelity.h"
#include <poll.h>
#include <sys/wait.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }

static int pidfd_open(pid_t p) { return syscall(SYS_pidfd_open, p, 0); }
static int pidfd_signal(int fd, int sig) { return syscall(SYS_pidfd_send_signal, fd, sig, NULL, 0); }

int main(void) {
    fid_init();
    signal(SIGUSR1, on_usr1);
    pid_t z = fork();
    if (z == 0) _exit(5);
    pid_t c = fork();
    if (c == 0) {
        int pp = pidfd_open(getppid());
        for (int i = 0; i < 30000 && !usr1; i++) msleep(1);
        struct pollfd q = {.fd = pp, .events = POLLIN};
        int ok = usr1 && pp >= 0 && pidfd_signal(pp, 0) == 0 && poll(&q, 1, 0) == 0;
        _exit(ok ? 0 : 1);
    }
    int pz = pidfd_open(z), pc = pidfd_open(c);
    siginfo_t si;
    CHECK(waitid(P_PID, z, &si, WEXITED | WNOWAIT) == 0, "zombie");
    msleep(20); /* the child opens its pidfd */
    ready();
    wait_go();
    struct pollfd q[2] = {{.fd = pz, .events = POLLIN}, {.fd = pc, .events = POLLIN}};
    CHECK(poll(q, 2, 0) == 1 && q[0].revents & POLLIN && !(q[1].revents & POLLIN), "pidfds: zombie readable, live not");
    CHECK(pidfd_signal(pc, SIGUSR1) == 0, "signal through the pidfd: %s", strerror(errno));
    memset(&si, 0, sizeof si);
    CHECK(waitid(P_PIDFD, pc, &si, WEXITED) == 0 && si.si_pid == c && si.si_code == CLD_EXITED && si.si_status == 0,
          "child through its pidfd: pid %d code %d status %d", si.si_pid, si.si_code, si.si_status);
    memset(&si, 0, sizeof si);
    CHECK(waitid(P_PIDFD, pz, &si, WEXITED) == 0 && si.si_pid == z && si.si_status == 5, "zombie through its pidfd");
    return finish();
}
