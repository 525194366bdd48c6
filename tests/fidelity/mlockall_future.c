/* mlockall(MCL_FUTURE) (no /proc file shows it) comes back: a mapping made after restore is
 * locked; one made before the dump stays locked. */
#include "fidelity.h"
#include <sys/mman.h>

static int locked(void *addr) {
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    int in = 0, lo = 0;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long s, e;
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2) { /* a mapping's first line */
            in = (unsigned long)addr >= s && (unsigned long)addr < e;
        } else if (in && !strncmp(line, "VmFlags:", 8)) {
            lo = strstr(line, " lo") != NULL;
            in = 0;
        }
    }
    if (f) fclose(f);
    return lo;
}

int main(void) {
    fid_init();
    if (mlockall(MCL_FUTURE)) { printf("FAIL setup: mlockall: %s\n", strerror(errno)); return 2; }
    char *before = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    before[0] = 'b';
    if (!locked(before)) { printf("FAIL setup: not locked\n"); return 2; }
    ready();
    wait_go();
    char *after = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(locked(after), "a new mapping is not locked: mlockall(MCL_FUTURE) lost");
    CHECK(locked(before) && before[0] == 'b', "the mapping made before the dump");
    return finish();
}
