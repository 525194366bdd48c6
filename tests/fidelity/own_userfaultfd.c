/* A process that uses userfaultfd itself (a write-protect registration of its own): pre-copy
 * must not take over its mappings; the dump is refused naming the userfaultfd, and the
 * process runs on untouched (its registration still works after the refusal). */
#include "fidelity.h"
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

int main(void) {
    fid_init();
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (uffd < 0) { printf("FAIL userfaultfd: %s\n", strerror(errno)); return 2; }
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(uffd, UFFDIO_API, &api)) { printf("FAIL UFFDIO_API: %s\n", strerror(errno)); return 2; }
    char *p = mmap(NULL, 4096 * 4, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 1, 4096 * 4);
    struct uffdio_register reg = {.range = {(unsigned long)p, 4096 * 4}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) { printf("FAIL UFFDIO_REGISTER: %s\n", strerror(errno)); return 2; }
    ready();
    wait_go();
    CHECK(p[0] == 1 && p[4096 * 3] == 1, "memory changed");
    struct uffdio_range r = {(unsigned long)p, 4096 * 4};
    CHECK(ioctl(uffd, UFFDIO_UNREGISTER, &r) == 0, "UFFDIO_UNREGISTER: %s", strerror(errno));
    return finish();
}
