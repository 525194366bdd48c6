/* O_PATH fds: of a symbolic link itself (O_PATH|O_NOFOLLOW; one dangling), of a directory and
 * of a regular file. After restore the link fds are still the links (readlinkat through them
 * gives the target, fstat says S_IFLNK, same inode), the others their files; fd flags kept. */
#include "fidelity.h"
#include <sys/stat.h>

static int same(int fd, const char *path) {
    struct stat a, b;
    return fstat(fd, &a) == 0 && lstat(path, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev &&
           a.st_mode == b.st_mode;
}

int main(void) {
    fid_init();
    symlink("target-file", "link");
    symlink("/nonexistent/dangling", "dangling");
    int t = open("target-file", O_CREAT | O_WRONLY, 0600);
    close(t);
    mkdir("dir", 0700);
    int l = open("link", O_PATH | O_NOFOLLOW);
    int d = open("dangling", O_PATH | O_NOFOLLOW | O_CLOEXEC);
    int p = open("dir", O_PATH | O_DIRECTORY);
    int f = open("target-file", O_PATH);
    int fl[4] = {fcntl(l, F_GETFL), fcntl(d, F_GETFL), fcntl(p, F_GETFL), fcntl(f, F_GETFL)};
    ready();
    wait_go();
    char buf[128] = {0};
    CHECK(readlinkat(l, "", buf, sizeof buf - 1) == 11 && !strcmp(buf, "target-file"), "link reads '%s'", buf);
    memset(buf, 0, sizeof buf);
    CHECK(readlinkat(d, "", buf, sizeof buf - 1) > 0 && !strcmp(buf, "/nonexistent/dangling"), "dangling reads '%s'",
          buf);
    struct stat st;
    CHECK(fstat(l, &st) == 0 && S_ISLNK(st.st_mode), "link fd is not a symlink");
    CHECK(same(l, "link") && same(d, "dangling") && same(p, "dir") && same(f, "target-file"), "not the same files");
    int now[4] = {fcntl(l, F_GETFL), fcntl(d, F_GETFL), fcntl(p, F_GETFL), fcntl(f, F_GETFL)};
    CHECK(!memcmp(fl, now, sizeof fl), "status flags %o %o, were %o %o", now[0], now[1], fl[0], fl[1]);
    CHECK((fcntl(d, F_GETFD) & FD_CLOEXEC) && !(fcntl(l, F_GETFD) & FD_CLOEXEC), "FD_CLOEXEC");
    int in = openat(p, "new", O_CREAT | O_WRONLY, 0600);
    CHECK(in >= 0, "openat through the O_PATH directory: %s", strerror(errno));
    return finish();
}
