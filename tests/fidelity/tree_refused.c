/* A process tree the engine cannot carry: child A holds a TCP listener (loopback, never
 * connected), child B has a SysV segment attached that its parent has attached too (saved per
 * image, it would split). The preflight names both children and
 * why, at once; the dump is refused and every process runs on. */
#include "fidelity.h"
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/shm.h>
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
    int id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    volatile char *m = shmat(id, NULL, 0);
    shmctl(id, IPC_RMID, NULL); /* gone with the last detach */
    m[0] = 'p';
    pid_t b = fork();
    if (b == 0) {
        close(rdy[0]);
        m[1] = 'c';
        write(rdy[1], "r", 1);
        close(rdy[1]);
        wait_usr1();
        _exit(usr1 && m[0] == 'p' ? 0 : 1);
    }
    close(rdy[1]);
    char buf[2];
    int got = 0;
    while (got < 2) {
        ssize_t k = read(rdy[0], buf + got, 2 - got);
        if (k <= 0) break;
        got += k;
    }
    close(rdy[0]);
    CHECK(got == 2 && buf[0] == 'r' && buf[1] == 'r', "children not ready");
    printf("A=%d B=%d\n", a, b);
    ready();
    wait_go();
    CHECK(m[1] == 'c', "child's write lost");
    int st;
    kill(a, SIGUSR1);
    CHECK(waitpid(a, &st, 0) == a && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child A: %#x", st);
    kill(b, SIGUSR1);
    CHECK(waitpid(b, &st, 0) == b && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child B: %#x", st);
    return finish();
}
