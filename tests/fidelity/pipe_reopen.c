/* A pipe reopened through /proc/self/fd: besides its two ends (fds 3 and 4), a second read-only
 * description (O_NONBLOCK, the ends have none), a write-only one and a read-write one. Unread
 * bytes written through two descriptions before the dump. After restore: the bytes once, each
 * description its own (access mode, O_NONBLOCK set on one does not show on another), all of one
 * pipe (what one writes another reads), and end of file once every writer is closed (the
 * restore kept no writer of its own). */
#include "fidelity.h"
#include <sys/stat.h>

static int reopen(int fd, int flags) {
    char p[64];
    snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
    return open(p, flags);
}

static int acc(int fd) { return fcntl(fd, F_GETFL) & (O_ACCMODE | O_NONBLOCK); }

int main(void) {
    fid_init();
    int p[2];
    if (pipe(p) != 0 || p[0] != 3 || p[1] != 4) { printf("FAIL pipe fds\n"); return 1; }
    int r2 = reopen(p[0], O_RDONLY | O_NONBLOCK);
    int w2 = reopen(p[1], O_WRONLY);
    int rw = reopen(p[0], O_RDWR);
    if (r2 != 5 || w2 != 6 || rw != 7) { printf("FAIL reopen: %s\n", strerror(errno)); return 1; }
    write(p[1], "abc", 3);
    write(w2, "def", 3);
    ready();
    wait_go();
    struct stat s0, s;
    fstat(p[0], &s0);
    for (int fd = 4; fd <= 7; fd++) CHECK(fstat(fd, &s) == 0 && s.st_ino == s0.st_ino && S_ISFIFO(s.st_mode), "fd %d is not of the pipe", fd);
    CHECK(acc(p[0]) == O_RDONLY && acc(p[1]) == O_WRONLY, "ends' flags %o %o", acc(p[0]), acc(p[1]));
    CHECK(acc(r2) == (O_RDONLY | O_NONBLOCK) && acc(w2) == O_WRONLY && acc(rw) == O_RDWR, "reopened flags %o %o %o",
          acc(r2), acc(w2), acc(rw));
    char b[16] = "";
    CHECK(read(r2, b, sizeof b) == 6 && !memcmp(b, "abcdef", 6), "unread bytes: %.16s", b);
    errno = 0;
    CHECK(read(r2, b, sizeof b) == -1 && errno == EAGAIN, "bytes came twice, or O_NONBLOCK lost");
    fcntl(w2, F_SETFL, O_NONBLOCK);
    CHECK(acc(p[1]) == O_WRONLY && acc(w2) == (O_WRONLY | O_NONBLOCK), "w2 and fd 4 are one description");
    fcntl(p[0], F_SETFL, O_NONBLOCK);
    CHECK(acc(rw) == O_RDWR && acc(r2) == (O_RDONLY | O_NONBLOCK), "fd 3 and another are one description");
    memset(b, 0, sizeof b);
    CHECK(write(rw, "xyz", 3) == 3 && read(p[0], b, sizeof b) == 3 && !memcmp(b, "xyz", 3), "rw -> fd 3");
    CHECK(write(w2, "12", 2) == 2 && read(rw, b, sizeof b) == 2 && !memcmp(b, "12", 2), "w2 -> rw");
    CHECK(write(p[1], "Q", 1) == 1 && read(r2, b, sizeof b) == 1 && b[0] == 'Q', "fd 4 -> r2");
    close(p[1]);
    close(w2);
    close(rw);
    CHECK(read(p[0], b, sizeof b) == 0 && read(r2, b, sizeof b) == 0, "no end of file: a writer is left");
    return finish();
}
