/* A memfd shared by parent and child: mapped by both (inherited MAP_SHARED), its fd one
 * description (one offset), and the child holds a description of its own (reopened through
 * /proc). After the restore it is still one object: writes through any mapping or fd of either
 * are seen by the other, and the shared offset moves for both. */
#include "fidelity.h"
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

int main(void) {
    fid_init();
    int mfd = memfd_create("tree-memfd", MFD_ALLOW_SEALING);
    if (mfd < 0 || ftruncate(mfd, 8192)) { printf("FAIL memfd\n"); return 1; }
    volatile char *m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (m == MAP_FAILED) { printf("FAIL mmap\n"); return 1; }
    m[0] = 'p';
    lseek(mfd, 100, SEEK_SET);
    pid_t c = fork();
    if (c == 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", mfd);
        int own = open(path, O_RDWR);
        m[1] = 'c';
        for (int i = 0; i < 30000 && m[2] != 'g'; i++) msleep(1);
        struct stat a, b;
        int ok = m[2] == 'g' && own >= 0 && fstat(own, &a) == 0 && fstat(mfd, &b) == 0 && a.st_ino == b.st_ino;
        ok = ok && pwrite(own, "child", 5, 4096) == 5;
        ok = ok && lseek(mfd, 0, SEEK_CUR) == 100 && lseek(own, 0, SEEK_CUR) == 0;
        lseek(mfd, 200, SEEK_SET);
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
    CHECK(memcmp((char *)m + 4096, "child", 5) == 0, "child's write through its own fd not seen");
    CHECK(lseek(mfd, 0, SEEK_CUR) == 200, "offset not shared: %ld", (long)lseek(mfd, 0, SEEK_CUR));
    int st = 0;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    return finish();
}
