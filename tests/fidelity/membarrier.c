/* membarrier registrations (private expedited, its SYNC_CORE and RSEQ flavours, global
 * expedited) come back: the expedited barriers still work after restore (EPERM if the
 * registration was lost), and MEMBARRIER_CMD_GET_REGISTRATIONS answers as before. */
#include "fidelity.h"
#include <linux/membarrier.h>

static long mb(int cmd) { return syscall(SYS_membarrier, cmd, 0, 0); }

int main(void) {
    fid_init();
    long q = mb(MEMBARRIER_CMD_QUERY);
    if (q < 0) { printf("FAIL setup: membarrier unsupported\n"); return 2; }
    int want[][2] = {
        {MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, MEMBARRIER_CMD_PRIVATE_EXPEDITED},
        {MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE},
        {MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ, MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ},
        {MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, MEMBARRIER_CMD_GLOBAL_EXPEDITED},
    };
    int n = 0, used[4];
    for (int i = 0; i < 4; i++) {
        if (!(q & want[i][0])) continue; /* not supported by this kernel */
        if (mb(want[i][0]) != 0) { printf("FAIL setup: register %#x: %s\n", want[i][0], strerror(errno)); return 2; }
        used[n++] = i;
    }
    long regs = syscall(SYS_membarrier, 1 << 9 /* GET_REGISTRATIONS */, 0, 0);
    ready();
    wait_go();
    for (int k = 0; k < n; k++) {
        int i = used[k];
        CHECK(mb(want[i][1]) == 0, "membarrier(%#x) after restore: %s", want[i][1], strerror(errno));
    }
    if (regs >= 0) {
        long now = syscall(SYS_membarrier, 1 << 9, 0, 0);
        CHECK(now == regs, "registrations %#lx, were %#lx", now, regs);
    }
    return finish();
}
