/* A child process: the dump is refused naming it (a copy would lose it and wait() would fail);
 * the parent runs on and reaps its child. */
#include "fidelity.h"
#include <sys/wait.h>

int main(void) {
    fid_init();
    pid_t c = fork();
    if (c == 0) { for (;;) pause(); }
    ready();
    wait_go();
    kill(c, SIGKILL);
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFSIGNALED(st), "child lost");
    return finish();
}
