/* POSIX shared memory (shm_open: a file in /dev/shm): an fd and a shared mapping of it are
 * carried as a file and a file mapping (the file must exist where the process is restored:
 * here, the same machine). After the restore the mapping has the contents, and a write through
 * the fd shows in the mapping (one object). Unlinks the object at the end. */
#include "fidelity.h"
#include <sys/mman.h>

int main(void) {
    fid_init();
    char name[64];
    snprintf(name, sizeof name, "/dvk-fid-posix-shm-%d", getpid());
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || ftruncate(fd, 2 * 4096)) { printf("FAIL shm_open: %s\n", strerror(errno)); return 2; }
    unsigned char *p = mmap(NULL, 2 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    for (int i = 0; i < 2 * 4096; i++) p[i] = (unsigned char)(i * 5 + 3);
    ready();
    wait_go();
    int bad = 0;
    for (int i = 0; i < 2 * 4096; i++) bad += p[i] != (unsigned char)(i * 5 + 3);
    CHECK(bad == 0, "%d bytes differ", bad);
    unsigned char b = 0x5A;
    CHECK(pwrite(fd, &b, 1, 4096 + 7) == 1 && p[4096 + 7] == 0x5A, "the fd and the mapping are not one object");
    shm_unlink(name);
    return finish();
}
