/* A tree whose checks do not depend on pid numbers, for a restore under new pids (the original
 * may still hold its pids): the root leads its own process group; child A leads its own group
 * with grandchild G in it; child B leads a new session; child C stays in the root's group;
 * child D joins A's group (neither its own nor its parent's); child Z has exited with status 7 (a zombie). They share a pipe each way (one byte of A's
 * unread at the dump) and anonymous shared memory. After "go": the root's wait(-1) reaps the
 * zombie with its status (no other child has ended yet); then each of A, B, C, D, G checks its
 * group and session against its own and its parent's pid, counts itself in the shared memory
 * and answers on the pipe; the root checks the answers, the count, and waits for its children. */
#include "fidelity.h"
#include <sys/mman.h>
#include <sys/wait.h>

static int down[2], up[2], rdy[2];
static volatile int *shm;

static int check(char role) {
    switch (role) {
    case 'A': return getpgrp() == getpid() && getsid(0) == getsid(getppid());
    case 'B': return getsid(0) == getpid() && getpgrp() == getpid();
    case 'C': return getpgrp() == getpgid(getppid()) && getpgrp() == getppid();
    case 'G': return getpgrp() == getppid() && getsid(0) == getsid(getppid());
    /* A's group (its pid now is checked from outside): another process's, which exists. */
    case 'D': return getpgrp() != getpid() && getpgrp() != getpgid(getppid()) && kill(-getpgrp(), 0) == 0;
    }
    return 0;
}

/* Waits for its byte from the root, checks, counts itself, answers. */
static int member(char role) {
    char x;
    if (read(down[0], &x, 1) != 1) return 10;
    int ok = check(role);
    __atomic_add_fetch(&shm[1], 1, __ATOMIC_SEQ_CST);
    char a = ok ? role : 'n';
    write(up[1], &a, 1);
    return ok ? 0 : 1;
}

int main(void) {
    fid_init();
    setpgid(0, 0);
    shm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED || pipe(down) || pipe(up) || pipe(rdy)) { printf("FAIL setup\n"); return 1; }
    shm[0] = 42;
    pid_t a = fork();
    if (a == 0) {
        setpgid(0, 0);
        pid_t g = fork();
        if (g == 0) {
            write(rdy[1], "r", 1);
            _exit(member('G'));
        }
        write(up[1], "a", 1); /* unread at the dump */
        write(rdy[1], "r", 1);
        int r = member('A');
        int st = 0;
        if (waitpid(-1, &st, 0) <= 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) r = 2;
        _exit(r);
    }
    setpgid(a, a); /* before D joins it */
    pid_t d = fork();
    if (d == 0) {
        setpgid(0, a);
        write(rdy[1], "r", 1);
        _exit(member('D'));
    }
    pid_t b = fork();
    if (b == 0) {
        setsid();
        write(rdy[1], "r", 1);
        _exit(member('B'));
    }
    pid_t c = fork();
    if (c == 0) {
        write(rdy[1], "r", 1);
        _exit(member('C'));
    }
    pid_t z = fork();
    if (z == 0) _exit(7);
    char r5[5];
    int got = 0;
    while (got < 5) {
        ssize_t k = read(rdy[0], r5, 5 - got);
        if (k <= 0) { printf("FAIL readiness\n"); return 1; }
        got += k;
    }
    siginfo_t si;
    waitid(P_PID, z, &si, WEXITED | WNOWAIT); /* a zombie now, not reaped */
    ready();
    wait_go();
    CHECK(shm[0] == 42, "shared memory: %d", shm[0]);
    int st = 0;
    pid_t w = waitpid(-1, &st, WNOHANG);
    CHECK(w > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 7, "the zombie: wait(-1) gave %d, status %#x", w, st);
    CHECK(write(down[1], "ggggg", 5) == 5, "write to the children");
    char ans[8] = {0};
    got = 0;
    while (got < 6) {
        ssize_t k = read(up[0], ans + got, 6 - got);
        if (k <= 0) break;
        got += k;
    }
    CHECK(got == 6 && ans[0] == 'a', "answers: %d bytes \"%s\"", got, ans);
    for (const char *r = "ABCDG"; *r; r++) CHECK(memchr(ans + 1, *r, 5) != NULL, "%c failed its checks: \"%s\"", *r, ans);
    CHECK(shm[1] == 5, "shared memory count: %d", shm[1]);
    int children = 0;
    while ((w = waitpid(-1, &st, 0)) > 0) {
        children++;
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child %d: status %#x", w, st);
    }
    CHECK(children == 4 && errno == ECHILD, "%d children waited for", children);
    return finish();
}
