/* A process tree the engine cannot carry: child A holds a TCP listener (loopback, never
 * connected); child B made grandchild G, then left for a session of its own (setsid), so G's
 * session is neither its own nor its parent's. The preflight names A and G and why, at once;
 * the dump is refused and every process runs on. */
#include "fidelity.h"
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }
static void wait_usr1(void) { for (int i = 0; i < 30000 && !usr1; i++) msleep(1); }

int main(void) {
    fid_init();
    signal(SIGUSR1, on_usr1);
    int rdy[2];
    pipe(rdy);
    pid_t a = fork();
    if (a == 0) {
        close(rdy[0]);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int ok = bind(s, (struct sockaddr *)&sa, sizeof sa) == 0 && listen(s, 1) == 0;
        write(rdy[1], ok ? "r" : "x", 1);
        close(rdy[1]);
        wait_usr1();
        _exit(usr1 ? 0 : 1);
    }
    pid_t b = fork();
    if (b == 0) {
        pid_t g = fork();
        if (g == 0) {
            close(rdy[0]);
            close(rdy[1]);
            wait_usr1();
            _exit(usr1 ? 0 : 1);
        }
        setsid();
        close(rdy[0]);
        char line[32];
        int n = snprintf(line, sizeof line, "%d", g);
        write(rdy[1], line, n); /* G's pid, then B is ready */
        close(rdy[1]);
        wait_usr1();
        kill(g, SIGUSR1);
        int st = 0;
        _exit(usr1 && waitpid(g, &st, 0) == g && WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1);
    }
    close(rdy[1]);
    char buf[64] = {0};
    int got = 0;
    for (;;) {
        ssize_t k = read(rdy[0], buf + got, sizeof buf - 1 - got);
        if (k <= 0) break;
        got += k;
    }
    close(rdy[0]);
    char *r = strchr(buf, 'r'); /* A's byte, before or after G's pid */
    CHECK(r != NULL && got > 1, "children not ready: %s", buf);
    if (r) memmove(r, r + 1, strlen(r));
    printf("A=%d G=%s\n", a, buf);
    ready();
    wait_go();
    int st;
    kill(a, SIGUSR1);
    CHECK(waitpid(a, &st, 0) == a && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child A: %#x", st);
    kill(b, SIGUSR1);
    CHECK(waitpid(b, &st, 0) == b && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child B: %#x", st);
    return finish();
}
