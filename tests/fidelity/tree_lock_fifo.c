/* A flock'd description and a FIFO shared by parent and child (inherited), plus the child's own
 * description of the FIFO, with unread bytes at the dump. After the restore the lock is still one
 * lock held by that one description (another description cannot take it until the child unlocks
 * through its inherited fd), and the FIFO's bytes are there once, new ones pass. */
#include "fidelity.h"
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }

static int try_lock(void) {
    int fd = open("lockf", O_RDWR);
    int r = flock(fd, LOCK_EX | LOCK_NB);
    int e = errno;
    close(fd);
    return r == 0 ? 0 : e;
}

static int read_exact(int fd, const char *want) {
    char b[16] = {0};
    size_t n = strlen(want), got = 0;
    for (int i = 0; i < 10000 && got < n; i++) {
        ssize_t k = read(fd, b + got, n - got);
        if (k > 0) got += k;
        else msleep(1);
    }
    return got == n && memcmp(b, want, n) == 0;
}

int main(void) {
    fid_init();
    signal(SIGUSR1, on_usr1);
    int fl = open("lockf", O_RDWR | O_CREAT, 0600);
    if (fl < 0 || flock(fl, LOCK_EX) != 0) { printf("FAIL lock\n"); return 1; }
    if (mkfifo("f", 0600) != 0) { printf("FAIL mkfifo\n"); return 1; }
    int ff = open("f", O_RDWR | O_NONBLOCK);
    write(ff, "fifo-1", 6);
    int rdy[2];
    pipe(rdy);
    pid_t c = fork();
    if (c == 0) {
        close(rdy[0]);
        int own = open("f", O_RDONLY | O_NONBLOCK);
        write(rdy[1], "r", 1);
        close(rdy[1]);
        for (int i = 0; i < 30000 && !usr1; i++) msleep(1);
        int ok = usr1 && own >= 0 && read_exact(own, "fifo-1") && read_exact(own, "fifo-2");
        ok = ok && flock(fl, LOCK_UN) == 0;
        _exit(ok ? 0 : 1);
    }
    close(rdy[1]);
    char b;
    CHECK(read(rdy[0], &b, 1) == 1, "child not ready");
    close(rdy[0]);
    CHECK(try_lock() == EWOULDBLOCK, "lock not held before the dump");
    ready();
    wait_go();
    CHECK(try_lock() == EWOULDBLOCK, "the lock was lost");
    kill(c, SIGUSR1);
    msleep(20);
    CHECK(write(ff, "fifo-2", 6) == 6, "write to the FIFO");
    int st = 0;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    CHECK(try_lock() == 0, "the child's unlock did not free the parent's lock: two descriptions");
    char x;
    CHECK(read(ff, &x, 1) == -1 && errno == EAGAIN, "FIFO data twice");
    return finish();
}
