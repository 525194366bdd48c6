/* Deleted directories: the working directory removed while the process is in it (and an fd of
 * it), and another directory held open through two descriptions, then removed. After restore:
 * the working directory and the fds are deleted directories again (nlink 0, "(deleted)" in
 * /proc, their modes), the two descriptions share one directory, the fd of "." is the
 * working directory, and neither path exists. */
#include "fidelity.h"
#include <sys/stat.h>

int main(void) {
    fid_init();
    open_ctl();
    char top[300], want[400], link[400];
    getcwd(top, sizeof top);
    mkdir("sub", 0750);
    mkdir("held", 0711);
    chmod("sub", 0750);
    chmod("held", 0711);
    int d = open("held", O_RDONLY | O_DIRECTORY);
    int d2 = open("held", O_RDONLY | O_DIRECTORY);
    rmdir("held");
    chdir("sub");
    int c = open(".", O_RDONLY | O_DIRECTORY);
    rmdir("../sub");
    ready();
    wait_go();
    char buf[256];
    CHECK(getcwd(buf, sizeof buf) == NULL && errno == ENOENT, "getcwd: the working directory is not deleted");
    ssize_t n = readlink("/proc/self/cwd", link, sizeof link - 1);
    link[n > 0 ? n : 0] = 0;
    snprintf(want, sizeof want, "%s/sub (deleted)", top);
    CHECK(strcmp(link, want) == 0, "cwd %s", link);
    struct stat sc, sd, sd2, sf;
    CHECK(stat(".", &sc) == 0 && sc.st_nlink == 0 && (sc.st_mode & 07777) == 0750, "cwd nlink %ld mode %o",
          (long)sc.st_nlink, sc.st_mode & 07777);
    CHECK(fstat(c, &sf) == 0 && sf.st_ino == sc.st_ino && sf.st_dev == sc.st_dev, "fd of . is not the cwd");
    CHECK(fstat(d, &sd) == 0 && fstat(d2, &sd2) == 0 && sd.st_ino == sd2.st_ino && sd.st_nlink == 0 &&
              (sd.st_mode & 07777) == 0711 && sd.st_ino != sc.st_ino,
          "held: nlink %ld mode %o", (long)sd.st_nlink, sd.st_mode & 07777);
    snprintf(buf, sizeof buf, "/proc/self/fd/%d", d);
    n = readlink(buf, link, sizeof link - 1);
    link[n > 0 ? n : 0] = 0;
    snprintf(want, sizeof want, "%s/held (deleted)", top);
    CHECK(strcmp(link, want) == 0, "held fd %s", link);
    CHECK(open("x", O_CREAT | O_WRONLY, 0600) == -1 && errno == ENOENT, "a file was created in the deleted cwd");
    snprintf(want, sizeof want, "%s/sub", top);
    CHECK(access(want, F_OK) == -1, "sub exists again");
    snprintf(want, sizeof want, "%s/held", top);
    CHECK(access(want, F_OK) == -1, "held exists again");
    CHECK(fchdir(d) == 0 && stat(".", &sf) == 0 && sf.st_ino == sd.st_ino, "fchdir to the held one");
    return finish();
}
