/* pidfds: one of the process itself (PIDFD_NONBLOCK) and one of a child that has exited with
 * status 7 and been reaped. After restore each gives the same answers: fdinfo
 * Pid (own pid / -1), poll (not readable / readable), pidfd_send_signal (0 / ESRCH), waitid
 * (ECHILD), and for the dead one PIDFD_GET_INFO: its exit status. */
#include "fidelity.h"
#include <poll.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/wait.h>

struct pidfd_info64 {
    uint64_t mask, cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
    int32_t exit_code;
};
#define PIDFD_GET_INFO_ 0xc040ff0bUL

static long fdinfo_pid(int fd) {
    char p[64], line[256];
    long v = -100;
    snprintf(p, sizeof p, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(p, "r");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "Pid: %ld", &v) == 1) break;
    if (f) fclose(f);
    return v;
}

static int readable(int fd) {
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

static void check_all(int self, int dead, const char *when) {
    CHECK(fdinfo_pid(self) == getpid(), "%s: self Pid %ld", when, fdinfo_pid(self));
    CHECK(fdinfo_pid(dead) == -1, "%s: dead Pid %ld", when, fdinfo_pid(dead));
    CHECK(!readable(self) && readable(dead), "%s: poll", when);
    CHECK(syscall(SYS_pidfd_send_signal, self, 0, NULL, 0) == 0, "%s: signal self: %s", when, strerror(errno));
    CHECK(syscall(SYS_pidfd_send_signal, dead, 0, NULL, 0) == -1 && errno == ESRCH, "%s: signal dead", when);
    siginfo_t si;
    CHECK(waitid(P_PIDFD, dead, &si, WEXITED | WNOHANG) == -1 && errno == ECHILD, "%s: waitid", when);
    CHECK(fcntl(self, F_GETFL) & O_NONBLOCK, "%s: PIDFD_NONBLOCK", when);
    CHECK(fcntl(dead, F_GETFD) & FD_CLOEXEC, "%s: close-on-exec", when);
    struct pidfd_info64 pi = {.mask = 8 /* PIDFD_INFO_EXIT */};
    CHECK(ioctl(dead, PIDFD_GET_INFO_, &pi) == 0 && (pi.mask & 8) && pi.exit_code == 7 << 8,
          "%s: PIDFD_GET_INFO mask %llx exit %x", when, (unsigned long long)pi.mask, pi.exit_code);
}

int main(void) {
    fid_init();
    int self = syscall(SYS_pidfd_open, getpid(), O_NONBLOCK);
    pid_t c = fork();
    if (c == 0) _exit(7);
    int dead = syscall(SYS_pidfd_open, c, 0);
    waitpid(c, NULL, 0);
    check_all(self, dead, "before");
    ready();
    wait_go();
    check_all(self, dead, "after");
    return finish();
}
