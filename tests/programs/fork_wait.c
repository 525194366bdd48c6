/* fork() and the wait family under the shim: the parent knows each child by the
 * PID fork() returned, which is the PID the child sees for itself.
 * Prints one "name ok" or "name FAIL ..." line per check, then "done".
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures;
static void check(const char *name, int ok, const char *fmt, long a, long b) {
    if (ok) {
        printf("%s ok\n", name);
    } else {
        printf("%s FAIL ", name);
        printf(fmt, a, b);
        printf("\n");
        failures++;
    }
    fflush(stdout);
}

/* The child reports its own getpid() through a pipe, then exits with `code`. */
static pid_t spawn(int code, pid_t *child_says, int linger) {
    int p[2];
    if (pipe(p) != 0) exit(2);
    pid_t pid = fork();
    if (pid == 0) {
        pid_t me = getpid();
        (void)!write(p[1], &me, sizeof me);
        if (linger) pause();
        _exit(code);
    }
    close(p[1]);
    if (read(p[0], child_says, sizeof *child_says) != sizeof *child_says) *child_says = -1;
    close(p[0]);
    return pid;
}

int main(void) {
    pid_t self = getpid(), says;

    pid_t a = spawn(7, &says, 0);
    check("fork-returns-child-getpid", a == says, "fork gave %ld, child says %ld", a, says);
    check("child-pid-is-virtual", a >= (1 << 22), "fork gave %ld (%ld)", a, 0);
    int st = 0;
    pid_t w = waitpid(a, &st, 0);
    check("waitpid-by-that-pid", w == a && WIFEXITED(st) && WEXITSTATUS(st) == 7, "waitpid gave %ld status %ld", w, st);

    pid_t b = spawn(0, &says, 1);
    check("kill-own-child-right-away", kill(b, SIGTERM) == 0, "kill(%ld) failed %ld", b, 0);
    w = wait(&st);
    check("wait-returns-that-pid", w == b && WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM, "wait gave %ld status %ld", w, st);

    pid_t c = spawn(3, &says, 0);
    siginfo_t si = {0};
    int rc = waitid(P_PID, c, &si, WEXITED);
    check("waitid-si_pid", rc == 0 && si.si_pid == c && si.si_status == 3, "waitid si_pid %ld want %ld", (long)si.si_pid, c);

    pid_t d = spawn(5, &says, 0);
    struct rusage ru;
    w = wait4(d, &st, 0, &ru);
    check("wait4-by-that-pid", w == d && WEXITSTATUS(st) == 5, "wait4 gave %ld want %ld", w, d);

    /* Process groups named by the child's PID, as a shell with job control does. */
    pid_t e = spawn(0, &says, 1);
    check("setpgid-of-child", setpgid(e, e) == 0, "setpgid(%ld) failed (%ld)", e, 0);
    check("getpgid-of-child", getpgid(e) > 0 && getpgid(e) != getpgid(0), "getpgid(%ld) gave %ld", e, (long)getpgid(e));
    check("kill-child-group", kill(-e, SIGTERM) == 0, "kill(-%ld) failed (%ld)", e, 0);
    w = waitpid(-e, &st, 0);
    check("waitpid-child-group", w == e && WIFSIGNALED(st), "waitpid(-%ld) gave %ld", e, w);

    w = waitpid(a, &st, WNOHANG);
    check("reaped-child-is-gone", w == -1, "waitpid of a reaped child gave %ld (%ld)", w, 0);
    check("parent-unchanged", getpid() == self, "getpid %ld was %ld", getpid(), self);
    printf("done %d\n", failures);
    return failures != 0;
}
