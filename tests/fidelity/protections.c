/* Protections and stack growth: data in a page later made PROT_NONE (read through
 * /proc/PID/mem at dump), an execute-only-ish r-x anonymous page holding code that still runs, a
 * read-only page that still faults on write; after restore the main stack still grows down on
 * demand (deep recursion using 8 MiB). */
#include "fidelity.h"
#include <setjmp.h>
#include <sys/mman.h>
#include <sys/resource.h>

static sigjmp_buf jb;
static void segv(int s) { (void)s; siglongjmp(jb, 1); }

static long deep(int n) {
    volatile char buf[4096];
    buf[0] = (char)n;
    buf[4095] = (char)n;
    return n == 0 ? buf[0] : deep(n - 1) + buf[4095];
}

int main(void) {
    fid_init();
    struct rlimit r = {64 << 20, 64 << 20};
    setrlimit(RLIMIT_STACK, &r);
    char *none = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(none, 'N', 8192);
    mprotect(none, 8192, PROT_NONE);
    unsigned char *code = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    static const unsigned char ret42[] = {0xb8, 42, 0, 0, 0, 0xc3}; /* mov eax, 42; ret */
    memcpy(code, ret42, sizeof ret42);
    mprotect(code, 4096, PROT_READ | PROT_EXEC);
    char *ro = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    strcpy(ro, "read-only");
    mprotect(ro, 4096, PROT_READ);
    ready();
    wait_go();
    CHECK(((int (*)(void))code)() == 42, "generated code");
    CHECK(strcmp(ro, "read-only") == 0, "ro page");
    signal(SIGSEGV, segv);
    int faulted = 0;
    if (sigsetjmp(jb, 1) == 0) { ro[0] = 'x'; } else faulted = 1;
    CHECK(faulted, "read-only page became writable");
    faulted = 0;
    if (sigsetjmp(jb, 1) == 0) { volatile char c = none[0]; (void)c; } else faulted = 1;
    CHECK(faulted, "PROT_NONE page became readable");
    mprotect(none, 8192, PROT_READ);
    CHECK(none[0] == 'N' && none[8191] == 'N', "PROT_NONE data lost");
    signal(SIGSEGV, SIG_DFL);
    volatile long d = deep(2048); /* 8 MiB: a crash here (no PASS) means the stack cannot grow */
    (void)d;
    return finish();
}
