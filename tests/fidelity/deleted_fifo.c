/* A FIFO deleted while open (mode 0640): read-only (fd 3, O_NONBLOCK), write-only (fd 4) and
 * read-write (fd 5) descriptions, unread bytes and a larger capacity. After restore: still
 * deleted (nlink 0, "(deleted)" in /proc, the name not back), one FIFO, mode, the bytes once,
 * each description's flags, what one writes another reads, end of file once every writer is
 * closed (the restore kept no opener of its own). With TAKEN set, the driver made a file at the
 * FIFO's path before the restore: a ".dvk-ghost.<inode>" name stood in for it. */
#include "fidelity.h"
#include <sys/stat.h>

static int acc(int fd) { return fcntl(fd, F_GETFL) & (O_ACCMODE | O_NONBLOCK); }

int main(void) {
    fid_init();
    mkfifo("gone.fifo", 0600);
    chmod("gone.fifo", 0640);
    int r = open("gone.fifo", O_RDONLY | O_NONBLOCK);
    int w = open("gone.fifo", O_WRONLY);
    int rw = open("gone.fifo", O_RDWR);
    if (r != 3 || w != 4 || rw != 5) { printf("FAIL open: %s\n", strerror(errno)); return 1; }
    struct stat orig;
    fstat(r, &orig);
    int taken = getenv("TAKEN") != NULL;
    char name[64];
    if (taken) snprintf(name, sizeof name, ".dvk-ghost.%lu", (unsigned long)orig.st_ino);
    else snprintf(name, sizeof name, "gone.fifo");
    fcntl(w, F_SETPIPE_SZ, 1 << 18);
    write(w, "ghost", 5);
    unlink("gone.fifo");
    ready();
    wait_go();
    struct stat s0, s;
    CHECK(fstat(r, &s0) == 0 && S_ISFIFO(s0.st_mode) && s0.st_nlink == 0 && (s0.st_mode & 07777) == 0640,
          "stat: nlink %ld mode %o", (long)s0.st_nlink, s0.st_mode);
    for (int fd = 4; fd <= 5; fd++) CHECK(fstat(fd, &s) == 0 && s.st_ino == s0.st_ino, "fd %d is another FIFO", fd);
    char link[512], cwd[400];
    ssize_t n = readlink("/proc/self/fd/3", link, sizeof link - 1);
    link[n > 0 ? n : 0] = 0;
    getcwd(cwd, sizeof cwd);
    strcat(cwd, "/");
    strcat(cwd, name);
    strcat(cwd, " (deleted)");
    CHECK(strcmp(link, cwd) == 0, "fd link %s", link);
    CHECK(access(name, F_OK) == -1, "the deleted FIFO came back");
    CHECK(!taken || access("gone.fifo", F_OK) == 0, "the file at the taken path is gone");
    CHECK(acc(r) == (O_RDONLY | O_NONBLOCK) && acc(w) == O_WRONLY && acc(rw) == O_RDWR, "flags %o %o %o", acc(r),
          acc(w), acc(rw));
    CHECK(fcntl(r, F_GETPIPE_SZ) >= (1 << 18), "pipe size %d", fcntl(r, F_GETPIPE_SZ));
    char b[16] = "";
    CHECK(read(r, b, sizeof b) == 5 && !memcmp(b, "ghost", 5), "unread bytes: %.16s", b);
    errno = 0;
    CHECK(read(r, b, sizeof b) == -1 && errno == EAGAIN, "bytes came twice, or O_NONBLOCK lost");
    memset(b, 0, sizeof b);
    CHECK(write(w, "more", 4) == 4 && read(rw, b, sizeof b) == 4 && !memcmp(b, "more", 4), "w -> rw");
    CHECK(write(rw, "xy", 2) == 2 && read(r, b, sizeof b) == 2 && !memcmp(b, "xy", 2), "rw -> r");
    close(w);
    close(rw);
    CHECK(read(r, b, sizeof b) == 0, "no end of file: a writer is left");
    return finish();
}
