/* A child made by vfork shares its parent's address space until it execs or exits: two
 * processes, one memory. A tree dump would bring back two memories: refused, naming it. The
 * child prints READY itself (the parent waits in vfork), waits for go and exits; the parent
 * then checks that it ran in the same memory. */
#include "fidelity.h"
#include <sys/wait.h>

static volatile int written_by_child;

int main(void) {
    fid_init();
    pid_t c = vfork();
    if (c == 0) {
        written_by_child = 1;
        ready();
        wait_go();
        _exit(0);
    }
    int st = 0;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "vfork child: %#x", st);
    CHECK(written_by_child == 1, "not one memory");
    return finish();
}
