/* Regular files at their fd numbers, with offsets, access modes, O_APPEND and close-on-exec; a
 * directory fd. */
#include "fidelity.h"
#include <dirent.h>

int main(void) {
    fid_init();
    int a = open("rw.txt", O_RDWR | O_CREAT | O_TRUNC, 0644);
    write(a, "0123456789abcdef", 16);
    lseek(a, 5, SEEK_SET);
    dup2(a, 42);
    close(a);
    int b = open("app.txt", O_WRONLY | O_CREAT | O_APPEND | O_TRUNC | O_CLOEXEC, 0644);
    write(b, "first\n", 6);
    dup2(b, 7);
    int ro = open("rw.txt", O_RDONLY);
    char c;
    read(ro, &c, 1); read(ro, &c, 1); read(ro, &c, 1);
    int d = open(".", O_RDONLY | O_DIRECTORY);
    ready();
    wait_go();
    CHECK(lseek(42, 0, SEEK_CUR) == 5, "fd 42 offset %ld", (long)lseek(42, 0, SEEK_CUR));
    CHECK((fcntl(42, F_GETFL) & O_ACCMODE) == O_RDWR, "fd 42 mode");
    char buf[4] = {0};
    CHECK(read(42, buf, 3) == 3 && memcmp(buf, "567", 3) == 0, "fd 42 read %s", buf);
    CHECK(fcntl(7, F_GETFL) & O_APPEND, "fd 7 lost O_APPEND");
    CHECK(fcntl(b, F_GETFD) & FD_CLOEXEC, "fd %d lost FD_CLOEXEC", b);
    CHECK(!(fcntl(7, F_GETFD) & FD_CLOEXEC), "fd 7 gained FD_CLOEXEC");
    CHECK(lseek(b, 0, SEEK_CUR) == lseek(7, 0, SEEK_CUR), "dup'd fds do not share the offset");
    write(7, "second\n", 7);
    CHECK(lseek(ro, 0, SEEK_CUR) == 3, "ro offset %ld", (long)lseek(ro, 0, SEEK_CUR));
    CHECK((fcntl(ro, F_GETFL) & O_ACCMODE) == O_RDONLY, "ro mode");
    CHECK(write(ro, "x", 1) == -1 && errno == EBADF, "ro is writable");
    int fda = open("app.txt", O_RDONLY);
    char all[64] = {0};
    read(fda, all, sizeof all - 1);
    CHECK(strcmp(all, "first\nsecond\n") == 0, "app.txt: %s", all);
    DIR *dir = fdopendir(d);
    int n = 0;
    while (dir && readdir(dir)) n++;
    CHECK(n >= 4, "directory fd: %d entries", n);
    return finish();
}
