/* fds open on the process's own /proc files (/proc/PID/status by number, /proc/self/maps,
 * the /proc/PID directory) come back opened on the restored process's own files, at their
 * offsets. */
#include "fidelity.h"

static int contains(int fd, const char *what) {
    static char buf[1 << 16];
    lseek(fd, 0, SEEK_SET);
    ssize_t n = read(fd, buf, sizeof buf - 1);
    if (n <= 0) return 0;
    buf[n] = 0;
    return strstr(buf, what) != NULL;
}

int main(void) {
    fid_init();
    char p[64];
    snprintf(p, sizeof p, "/proc/%d/status", getpid());
    int status = open(p, O_RDONLY);
    int maps = open("/proc/self/maps", O_RDONLY);
    snprintf(p, sizeof p, "/proc/%d", getpid());
    int dir = open(p, O_RDONLY | O_DIRECTORY);
    char b[16];
    read(maps, b, sizeof b); /* an offset to keep */
    ready();
    wait_go();
    char want[64];
    snprintf(want, sizeof want, "Pid:\t%d\n", getpid());
    CHECK(contains(status, want), "/proc/PID/status is not this process's");
    CHECK(contains(maps, "[stack]"), "/proc/self/maps");
    int fd = openat(dir, "comm", O_RDONLY);
    CHECK(fd >= 0 && contains(fd, "proc_self_files"), "/proc/PID directory fd");
    return finish();
}
