/* File locks of every kind, carried: POSIX record locks (fcntl F_SETLK: a write lock on bytes 0-9
 * and a read lock from byte 20 to EOF), OFD locks (F_OFD_SETLK: write on 5-14, read on 100-109),
 * flock LOCK_EX (on a description with a dup) and LOCK_SH. After the restore the program checks
 * what it can see itself (OFD and flock locks conflict with its own other descriptions; its
 * POSIX locks are in its fdinfo); the driver runs lock_contender, a separate process, to see the
 * POSIX locks as another process does. The fds are 3 (posix.lock), 4 (ofd.lock),
 * 5 and 6 (flock_ex.lock, one description), 7 (flock_sh.lock). */
#include "fidelity.h"
#include <sys/file.h>

static int lock(int fd, int cmd, short type, off_t start, off_t len) {
    struct flock l = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    return fcntl(fd, cmd, &l);
}

/* What F_OFD_GETLK reports for a `type` lock on start/len from a new description of `path`. */
static struct flock ofd_probe(const char *path, short type, off_t start, off_t len) {
    struct flock l = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    int fd = open(path, O_RDWR);
    if (fcntl(fd, F_OFD_GETLK, &l) != 0) l.l_type = -1;
    close(fd); /* no POSIX lock of ours on this file: closing drops nothing */
    return l;
}

static int flock_try(const char *path, int op) {
    int fd = open(path, O_RDWR);
    int r = flock(fd, op | LOCK_NB);
    int e = errno;
    close(fd);
    return r == 0 ? 0 : e;
}

int main(void) {
    fid_init();
    int p = open("posix.lock", O_RDWR | O_CREAT, 0600);
    int o = open("ofd.lock", O_RDWR | O_CREAT, 0600);
    int fe = open("flock_ex.lock", O_RDWR | O_CREAT, 0600);
    int fe2 = dup(fe);
    int fs = open("flock_sh.lock", O_RDWR | O_CREAT, 0600);
    if (p != 3 || o != 4 || fe != 5 || fe2 != 6 || fs != 7) { printf("FAIL fds %d %d %d %d %d\n", p, o, fe, fe2, fs); return 2; }
    if (lock(p, F_SETLK, F_WRLCK, 0, 10) || lock(p, F_SETLK, F_RDLCK, 20, 0) ||
        lock(o, F_OFD_SETLK, F_WRLCK, 5, 10) || lock(o, F_OFD_SETLK, F_RDLCK, 100, 10) ||
        flock(fe, LOCK_EX) || flock(fs, LOCK_SH)) {
        printf("FAIL taking the locks: %s\n", strerror(errno));
        return 2;
    }
    ready();
    wait_go();

    /* flock: LOCK_EX held (on the description of fds 5 and 6), LOCK_SH shared. */
    CHECK(flock_try("flock_ex.lock", LOCK_SH) == EWOULDBLOCK, "LOCK_EX on flock_ex.lock lost");
    CHECK(flock_try("flock_sh.lock", LOCK_SH) == 0, "LOCK_SH on flock_sh.lock is not shared");
    CHECK(flock_try("flock_sh.lock", LOCK_EX) == EWOULDBLOCK, "LOCK_SH on flock_sh.lock lost");
    /* OFD: exactly the ranges and types taken. */
    struct flock l = ofd_probe("ofd.lock", F_RDLCK, 0, 50);
    CHECK(l.l_type == F_WRLCK && l.l_start == 5 && l.l_len == 10 && l.l_pid == -1,
          "OFD write lock 5-14: type %d start %ld len %ld pid %d", l.l_type, (long)l.l_start, (long)l.l_len, l.l_pid);
    l = ofd_probe("ofd.lock", F_WRLCK, 100, 1);
    CHECK(l.l_type == F_RDLCK && l.l_start == 100 && l.l_len == 10, "OFD read lock 100-109: type %d start %ld len %ld",
          l.l_type, (long)l.l_start, (long)l.l_len);
    l = ofd_probe("ofd.lock", F_RDLCK, 100, 10);
    CHECK(l.l_type == F_UNLCK, "OFD read lock 100-109 blocks a reader (type %d)", l.l_type);
    l = ofd_probe("ofd.lock", F_WRLCK, 15, 85);
    CHECK(l.l_type == F_UNLCK, "OFD locks outside 5-14/100-109 (type %d start %ld)", l.l_type, (long)l.l_start);
    /* POSIX: ours, as our fdinfo shows (F_GETLK cannot see a process's own locks). */
    char path[64], buf[4096] = {0};
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", p);
    int in = open(path, O_RDONLY);
    read(in, buf, sizeof buf - 1);
    close(in);
    char want[64];
    snprintf(want, sizeof want, "POSIX  ADVISORY  WRITE %d ", getpid());
    CHECK(strstr(buf, want) && strstr(buf, " 0 9\n"), "POSIX write lock 0-9 not ours: %s", buf);
    snprintf(want, sizeof want, "POSIX  ADVISORY  READ %d ", getpid());
    CHECK(strstr(buf, want) && strstr(buf, " 20 EOF\n"), "POSIX read lock 20-EOF not ours: %s", buf);
    /* Still the owner: the write lock can be turned into a read lock and back. */
    CHECK(lock(p, F_SETLK, F_RDLCK, 0, 10) == 0 && lock(p, F_SETLK, F_WRLCK, 0, 10) == 0, "POSIX lock not ours");
    return finish();
}
