/* Three levels, sessions and process groups: the root leads its own group; child C leads a
 * new session (setsid) with grandchildren G1 (its own group), G2 (C's group) and G3 (G1's
 * group); child C2 stays in the root's group. After the restore each process has its pid,
 * parent, session and group as before; C waits for its children, the root for its own. */
#include "fidelity.h"
#include <sys/wait.h>

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }

struct ids { pid_t pid, ppid, sid, pgid; };
static struct ids now(void) { struct ids i = {getpid(), getppid(), getsid(0), getpgid(0)}; return i; }
static int same(struct ids a) { struct ids b = now(); return a.pid == b.pid && a.ppid == b.ppid && a.sid == b.sid && a.pgid == b.pgid; }

static void wait_usr1(void) { for (int i = 0; i < 30000 && !usr1; i++) msleep(1); }

/* Sets up, tells the root (one byte on the readiness pipe), waits for SIGUSR1, checks. */
static int leaf(int rdy, pid_t group) {
    if (group >= 0) setpgid(0, group);
    struct ids was = now();
    write(rdy, "r", 1);
    close(rdy);
    wait_usr1();
    return usr1 && same(was) ? 0 : 1;
}

int main(void) {
    fid_init();
    signal(SIGUSR1, on_usr1);
    setpgid(0, 0);
    int rdy[2];
    pipe(rdy);
    pid_t c = fork();
    if (c == 0) {
        close(rdy[0]);
        setsid();
        pid_t g[3];
        g[0] = fork();
        if (g[0] == 0) _exit(leaf(rdy[1], 0));
        setpgid(g[0], g[0]);
        g[1] = fork();
        if (g[1] == 0) _exit(leaf(rdy[1], -1));
        g[2] = fork();
        if (g[2] == 0) _exit(leaf(rdy[1], g[0]));
        setpgid(g[2], g[0]);
        struct ids was = now();
        write(rdy[1], "r", 1);
        close(rdy[1]);
        wait_usr1();
        int ok = usr1 && same(was) && getsid(g[1]) == getpid() && getpgid(g[2]) == g[0];
        for (int i = 0; i < 3; i++) {
            int st = 0;
            kill(g[i], SIGUSR1);
            ok = ok && waitpid(g[i], &st, 0) == g[i] && WIFEXITED(st) && WEXITSTATUS(st) == 0;
        }
        _exit(ok ? 0 : 1);
    }
    pid_t c2 = fork();
    if (c2 == 0) { close(rdy[0]); _exit(leaf(rdy[1], -1)); }
    close(rdy[1]);
    /* Up to EOF: every process has written its byte and closed its end (a writer still
     * holding one when the read end is closed here would hold a pipe nobody in the tree reads). */
    char b[8];
    int got = 0;
    for (ssize_t k; (k = read(rdy[0], b, sizeof b)) > 0;) got += k;
    close(rdy[0]);
    CHECK(got == 5, "only %d processes got ready", got);
    struct ids was = now();
    ready();
    wait_go();
    CHECK(same(was), "the root's ids changed");
    CHECK(getpgid(c2) == getpid() && getsid(c) == c, "children's group/session");
    int st = 0;
    kill(c, SIGUSR1);
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child with a session: %#x", st);
    st = 0;
    kill(c2, SIGUSR1);
    CHECK(waitpid(c2, &st, 0) == c2 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child in the root's group: %#x", st);
    return finish();
}
