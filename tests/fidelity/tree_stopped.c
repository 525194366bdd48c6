/* A child in a job-control stop (SIGSTOP, already reported to its parent) comes back stopped:
 * after the restore it is still "T" and does not run until SIGCONT; then it ends when told. */
#include "fidelity.h"
#include <sys/wait.h>

static char state(pid_t p) {
    char path[64], b[512] = {0};
    snprintf(path, sizeof path, "/proc/%d/stat", p);
    int fd = open(path, O_RDONLY);
    read(fd, b, sizeof b - 1);
    close(fd);
    char *r = strrchr(b, ')');
    return r && r[1] ? r[2] : '?';
}

int main(void) {
    fid_init();
    pid_t c = fork();
    if (c == 0) {
        for (int i = 0; i < 60000; i++) msleep(1);
        _exit(0);
    }
    kill(c, SIGSTOP);
    int st = 0;
    CHECK(waitpid(c, &st, WUNTRACED) == c && WIFSTOPPED(st), "child did not stop");
    ready();
    wait_go();
    msleep(20);
    CHECK(state(c) == 'T', "the child runs after the restore (state %c)", state(c));
    kill(c, SIGCONT);
    for (int i = 0; i < 1000 && state(c) == 'T'; i++) msleep(1);
    CHECK(state(c) != 'T', "SIGCONT did not resume it");
    kill(c, SIGKILL);
    st = 0;
    for (int i = 0; i < 4; i++) { /* a stop or continue report may come first */
        if (waitpid(c, &st, 0) != c || WIFSIGNALED(st)) break;
    }
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "child status %#x", st);
    return finish();
}
