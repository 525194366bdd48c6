/* A process tree with zombies: one child exited with 42, one was killed by SIGTERM, one by
 * SIGKILL, none reaped at the dump; a live child waits for SIGUSR1. After the restore the parent collects the
 * zombies' statuses, no SIGCHLD arrives that had not arrived before, and the live child (still
 * its child, same pid) exits when told. */
#include "fidelity.h"
#include <sys/wait.h>

static volatile sig_atomic_t chld, usr1;
static void on_chld(int s) { (void)s; chld++; }
static void on_usr1(int s) { (void)s; usr1 = 1; }

int main(void) {
    fid_init();
    signal(SIGCHLD, on_chld);
    signal(SIGUSR1, on_usr1); /* inherited: set before the child could be told */
    pid_t me = getpid();
    pid_t z1 = fork();
    if (z1 == 0) _exit(42);
    pid_t z2 = fork();
    if (z2 == 0) { signal(SIGTERM, SIG_DFL); raise(SIGTERM); _exit(1); }
    pid_t z3 = fork();
    if (z3 == 0) { for (;;) pause(); }
    kill(z3, SIGKILL);
    pid_t live = fork();
    if (live == 0) {
        pid_t pp = getppid();
        for (int i = 0; i < 30000 && !usr1; i++) msleep(1);
        _exit(usr1 && getppid() == pp && pp == me ? 7 : 8);
    }
    siginfo_t si;
    CHECK(waitid(P_PID, z1, &si, WEXITED | WNOWAIT) == 0, "waitid z1");
    CHECK(waitid(P_PID, z2, &si, WEXITED | WNOWAIT) == 0, "waitid z2");
    CHECK(waitid(P_PID, z3, &si, WEXITED | WNOWAIT) == 0, "waitid z3");
    msleep(10); /* let both SIGCHLDs be handled */
    int seen = chld;
    ready();
    wait_go();
    CHECK(chld == seen, "SIGCHLD count went from %d to %d without a child ending", seen, (int)chld);
    int st = 0;
    CHECK(waitpid(z1, &st, WNOHANG) == z1, "zombie %d lost", z1);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 42, "zombie 1 status %#x", st);
    st = 0;
    CHECK(waitpid(z2, &st, WNOHANG) == z2, "zombie %d lost", z2);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM, "zombie 2 status %#x", st);
    st = 0;
    CHECK(waitpid(z3, &st, WNOHANG) == z3, "zombie %d lost", z3);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "zombie 3 status %#x", st);
    CHECK(kill(live, SIGUSR1) == 0, "live child %d gone", live);
    st = 0;
    CHECK(waitpid(live, &st, 0) == live, "live child not ours");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 7, "live child status %#x", st);
    CHECK(chld > seen, "no SIGCHLD for the live child's exit");
    CHECK(waitpid(-1, &st, WNOHANG) == -1 && errno == ECHILD, "a child too many");
    return finish();
}
