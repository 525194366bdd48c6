/* fs_base / TLS: a __thread variable, errno, and the fs base itself survive. */
#include "fidelity.h"
#include <asm/prctl.h>

static __thread uint64_t tv = 0x1234567890abcdefull;

int main(void) {
    fid_init();
    unsigned long fs0 = 0, fs1 = 0;
    syscall(SYS_arch_prctl, ARCH_GET_FS, &fs0);
    tv ^= 0xffff;
    ready();
    wait_go();
    syscall(SYS_arch_prctl, ARCH_GET_FS, &fs1);
    CHECK(fs0 == fs1, "fs_base %#lx -> %#lx", fs0, fs1);
    CHECK(tv == (0x1234567890abcdefull ^ 0xffff), "tls var %#lx", (unsigned long)tv);
    errno = 0;
    close(-1);
    CHECK(errno == EBADF, "errno %d", errno);
    return finish();
}
