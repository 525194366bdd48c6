/* A memfd and a file deleted while open, each shared by parent and child: mapped by both
 * (inherited MAP_SHARED), its fd one description (one offset), and the child holds a description
 * of its own (reopened through /proc). After the restore each is still one object: writes
 * through any mapping or fd of either are seen by the other, the shared offset moves for both. */
#include "fidelity.h"
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

struct obj { int fd; volatile char *m; };

static int make(struct obj *o, int memfd) {
    if (memfd) {
        o->fd = memfd_create("tree-memfd", MFD_ALLOW_SEALING);
    } else {
        o->fd = open("gone", O_RDWR | O_CREAT | O_EXCL, 0600);
        unlink("gone");
    }
    if (o->fd < 0 || ftruncate(o->fd, 8192)) return 0;
    o->m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, o->fd, 0);
    if (o->m == MAP_FAILED) return 0;
    o->m[0] = 'p';
    lseek(o->fd, 100, SEEK_SET);
    return 1;
}

/* In the child, after the restore: its own description is the same file, writes through it
 * reach the mapping, the inherited offset is still 100 (then moved to 200). */
static int child_checks(struct obj *o, int own) {
    struct stat a, b;
    int ok = own >= 0 && fstat(own, &a) == 0 && fstat(o->fd, &b) == 0 && a.st_ino == b.st_ino;
    ok = ok && pwrite(own, "child", 5, 4096) == 5;
    ok = ok && lseek(o->fd, 0, SEEK_CUR) == 100 && lseek(own, 0, SEEK_CUR) == 0;
    lseek(o->fd, 200, SEEK_SET);
    return ok;
}

static int reopen(int fd) {
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    return open(path, O_RDWR);
}

int main(void) {
    fid_init();
    struct obj o[2];
    if (!make(&o[0], 1) || !make(&o[1], 0)) { printf("FAIL setup\n"); return 1; }
    volatile char *m = o[0].m;
    pid_t c = fork();
    if (c == 0) {
        int own[2] = {reopen(o[0].fd), reopen(o[1].fd)};
        m[1] = 'c';
        for (int i = 0; i < 30000 && m[2] != 'g'; i++) msleep(1);
        int ok = m[2] == 'g' && child_checks(&o[0], own[0]) && child_checks(&o[1], own[1]);
        m[3] = ok ? 'y' : 'n';
        _exit(ok ? 0 : 1);
    }
    for (int i = 0; i < 10000 && m[1] != 'c'; i++) msleep(1);
    CHECK(m[1] == 'c', "child did not write before the dump");
    ready();
    wait_go();
    m[2] = 'g';
    for (int i = 0; i < 10000 && m[3] == 0; i++) msleep(1);
    CHECK(m[3] == 'y', "child's checks: %c", m[3] ? m[3] : '0');
    for (int k = 0; k < 2; k++) {
        const char *what = k ? "deleted file" : "memfd";
        CHECK(memcmp((char *)o[k].m + 4096, "child", 5) == 0, "%s: child's write through its own fd not seen", what);
        CHECK(lseek(o[k].fd, 0, SEEK_CUR) == 200, "%s: offset not shared: %ld", what, (long)lseek(o[k].fd, 0, SEEK_CUR));
    }
    int st = 0;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    return finish();
}
