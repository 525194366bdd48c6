/* fds of the process's own namespaces (/proc/self/ns/net, uts, pid_for_children, one without
 * close-on-exec): after restore each is an fd of the namespace the process lives in, of its
 * kind, with its fd flags; setns to it works. */
#define _GNU_SOURCE
#include "fidelity.h"
#include <linux/nsfs.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

static int same_file(int fd, const char *path) {
    struct stat a, b;
    return fstat(fd, &a) == 0 && stat(path, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev;
}

int main(void) {
    fid_init();
    int net = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    int uts = open("/proc/self/ns/uts", O_RDONLY);
    int pid = open("/proc/self/ns/pid_for_children", O_RDONLY | O_CLOEXEC);
    ready();
    wait_go();
    CHECK(same_file(net, "/proc/self/ns/net"), "net fd is not our net namespace");
    CHECK(same_file(uts, "/proc/self/ns/uts"), "uts fd is not our uts namespace");
    CHECK(same_file(pid, "/proc/self/ns/pid_for_children"), "pid fd is not our pid namespace");
    CHECK(ioctl(net, NS_GET_NSTYPE) == CLONE_NEWNET, "net fd type %d", ioctl(net, NS_GET_NSTYPE));
    CHECK(ioctl(uts, NS_GET_NSTYPE) == CLONE_NEWUTS, "uts fd type");
    CHECK(ioctl(pid, NS_GET_NSTYPE) == CLONE_NEWPID, "pid fd type");
    CHECK((fcntl(net, F_GETFD) & FD_CLOEXEC) && !(fcntl(uts, F_GETFD) & FD_CLOEXEC), "FD_CLOEXEC");
    CHECK(setns(uts, CLONE_NEWUTS) == 0, "setns(uts): %s", strerror(errno));
    return finish();
}
