/* memfd: one kept as fd 7 (offset, seals, name) and mapped shared and private (a copied-on-write
 * page); another only mapped, its fd closed. After restore the shared mapping and the fd are
 * still one object, the private copy kept its own page. */
#include "fidelity.h"
#include <sys/mman.h>

int main(void) {
    fid_init();
    int fd = memfd_create("dvk-test", MFD_ALLOW_SEALING);
    char page[4096];
    for (int p = 0; p < 3; p++) { memset(page, 'a' + p, sizeof page); write(fd, page, sizeof page); }
    ftruncate(fd, 5 * 4096); /* a hole at the end */
    dup2(fd, 7); close(fd);
    lseek(7, 100, SEEK_SET);
    fcntl(7, F_ADD_SEALS, F_SEAL_SHRINK);
    char *sh = mmap(NULL, 5 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, 7, 0);
    char *pr = mmap(NULL, 5 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, 7, 0);
    sh[2 * 4096] = 'S';
    volatile char x = pr[0]; (void)x;
    pr[4096] = 'P'; /* COW page */
    int g = memfd_create("only-mapped", 0);
    ftruncate(g, 8192);
    char *gm = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, g, 0);
    close(g);
    strcpy(gm + 5000, "mapped only");
    ready();
    wait_go();
    CHECK(lseek(7, 0, SEEK_CUR) == 100, "offset %ld", (long)lseek(7, 0, SEEK_CUR));
    CHECK(fcntl(7, F_GET_SEALS) == F_SEAL_SHRINK, "seals %#x", fcntl(7, F_GET_SEALS));
    char link[128] = {0};
    readlink("/proc/self/fd/7", link, sizeof link - 1);
    CHECK(strcmp(link, "/memfd:dvk-test (deleted)") == 0, "name %s", link);
    char b = 0;
    pread(7, &b, 1, 2 * 4096);
    CHECK(b == 'S', "write through the shared mapping lost: %c", b);
    pwrite(7, "W", 1, 4096 + 1);
    CHECK(sh[4096 + 1] == 'W', "fd and shared mapping are not one object");
    CHECK(pr[4096] == 'P' && pr[4096 + 1] == 'b', "private copy: %c %c", pr[4096], pr[4096 + 1]);
    CHECK(pr[0] == 'a' && sh[4 * 4096] == 0, "content");
    CHECK(strcmp(gm + 5000, "mapped only") == 0, "mapped-only memfd");
    CHECK(ftruncate(7, 4096) == -1 && errno == EPERM, "F_SEAL_SHRINK not enforced");
    return finish();
}
