/* memfds as programs use them to run generated code: the mode set with fchmod (0642 on one,
 * 0755 on the other) comes back; a copy of /bin/true in a memfd can still be run with execveat
 * (nothing holds it open for writing: ETXTBSY would say so). */
#include "fidelity.h"
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

/* Runs the memfd in a child; returns 0 if it ran and exited 0, else the child's errno. */
static int run(int fd) {
    pid_t c = fork();
    if (c == 0) {
        char *argv[] = {"true", NULL}, *envp[] = {NULL};
        syscall(SYS_execveat, fd, "", argv, envp, AT_EMPTY_PATH);
        _exit(100 + errno);
    }
    int st = 0;
    waitpid(c, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

int main(void) {
    fid_init();
    int data = memfd_create("fid-data", MFD_CLOEXEC);
    write(data, "data", 4);
    fchmod(data, 0642);
    int prog = memfd_create("fid-prog", MFD_CLOEXEC);
    int src = open("/bin/true", O_RDONLY);
    char buf[65536];
    ssize_t n;
    while ((n = read(src, buf, sizeof buf)) > 0) write(prog, buf, n);
    close(src);
    fchmod(prog, 0755);
    int r = run(prog);
    if (r != 0) { printf("FAIL setup: execveat of the memfd before the dump: %d\n", r); return 2; }
    ready();
    wait_go();
    struct stat s1, s2;
    fstat(data, &s1);
    fstat(prog, &s2);
    CHECK((s1.st_mode & 07777) == 0642, "data memfd mode %o, want 642", s1.st_mode & 07777);
    CHECK((s2.st_mode & 07777) == 0755, "program memfd mode %o, want 755", s2.st_mode & 07777);
    char d[8] = "";
    CHECK(pread(data, d, 4, 0) == 4 && !memcmp(d, "data", 4), "data memfd content");
    r = run(prog);
    CHECK(r == 0, "execveat of the memfd after restore: %s", r >= 100 ? strerror(r - 100) : "exit status");
    return finish();
}
