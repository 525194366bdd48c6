/* Register state across the dump: callee-saved general registers, xmm/ymm registers and MXCSR
 * are loaded with known values, then an assembly loop (no calls that could clobber them) polls
 * the control FIFO with raw syscalls until go; the values are stored and compared afterwards. */
#include "fidelity.h"
#include <cpuid.h>

static uint8_t in[8][32] __attribute__((aligned(32))), out[8][32] __attribute__((aligned(32)));
static uint64_t gin[4] = {0x1111222233334444ull, 0x5555666677778888ull, 0x9999aaaabbbbccccull, 0xddddeeeeffff0001ull};
static uint64_t gout[4];

int main(void) {
    fid_init();
    unsigned a = 0, b = 0, c = 0, d = 0;
    __get_cpuid(1, &a, &b, &c, &d);
    int avx = (c >> 28) & 1;
    for (int r = 0; r < 8; r++) for (int i = 0; i < 32; i++) in[r][i] = (uint8_t)(r * 37 + i * 11 + 1);
    unsigned mxcsr_in = 0x7f80 | (3 << 13) /* round toward zero */, mxcsr_out = 0;
    ready();
    char buf;
    long fd = ctl_fd;
    if (avx) {
        __asm__ volatile(
            "ldmxcsr %[mi]\n"
            "vmovdqa 0(%[in]), %%ymm8\n vmovdqa 32(%[in]), %%ymm9\n vmovdqa 64(%[in]), %%ymm10\n vmovdqa 96(%[in]), %%ymm11\n"
            "vmovdqa 128(%[in]), %%ymm12\n vmovdqa 160(%[in]), %%ymm13\n vmovdqa 192(%[in]), %%ymm14\n vmovdqa 224(%[in]), %%ymm15\n"
            "mov 0(%[gi]), %%r12\n mov 8(%[gi]), %%r13\n mov 16(%[gi]), %%r14\n mov 24(%[gi]), %%r15\n"
            "1:\n"
            "mov $0, %%eax\n mov %[fd], %%rdi\n lea %[buf], %%rsi\n mov $1, %%edx\n syscall\n"
            "cmp $1, %%rax\n je 2f\n"
            "mov $24, %%eax\n syscall\n" /* sched_yield */
            "jmp 1b\n"
            "2:\n"
            "vmovdqa %%ymm8, 0(%[out])\n vmovdqa %%ymm9, 32(%[out])\n vmovdqa %%ymm10, 64(%[out])\n vmovdqa %%ymm11, 96(%[out])\n"
            "vmovdqa %%ymm12, 128(%[out])\n vmovdqa %%ymm13, 160(%[out])\n vmovdqa %%ymm14, 192(%[out])\n vmovdqa %%ymm15, 224(%[out])\n"
            "mov %%r12, 0(%[go])\n mov %%r13, 8(%[go])\n mov %%r14, 16(%[go])\n mov %%r15, 24(%[go])\n"
            "stmxcsr %[mo]\n"
            : [mo] "=m"(mxcsr_out), [buf] "=m"(buf)
            : [in] "r"(in), [out] "r"(out), [gi] "r"(gin), [go] "r"(gout), [fd] "r"(fd), [mi] "m"(mxcsr_in)
            : "rax", "rdi", "rsi", "rdx", "rcx", "r11", "r12", "r13", "r14", "r15", "memory",
              "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
        for (int r = 0; r < 8; r++) CHECK(memcmp(in[r], out[r], 32) == 0, "ymm%d differs", r + 8);
    } else {
        printf("(no AVX: checking general registers only)\n");
        __asm__ volatile(
            "ldmxcsr %[mi]\n"
            "mov 0(%[gi]), %%r12\n mov 8(%[gi]), %%r13\n mov 16(%[gi]), %%r14\n mov 24(%[gi]), %%r15\n"
            "1:\n mov $0, %%eax\n mov %[fd], %%rdi\n lea %[buf], %%rsi\n mov $1, %%edx\n syscall\n"
            "cmp $1, %%rax\n je 2f\n mov $24, %%eax\n syscall\n jmp 1b\n 2:\n"
            "mov %%r12, 0(%[go])\n mov %%r13, 8(%[go])\n mov %%r14, 16(%[go])\n mov %%r15, 24(%[go])\n stmxcsr %[mo]\n"
            : [mo] "=m"(mxcsr_out), [buf] "=m"(buf)
            : [gi] "r"(gin), [go] "r"(gout), [fd] "r"(fd), [mi] "m"(mxcsr_in)
            : "rax", "rdi", "rsi", "rdx", "rcx", "r11", "r12", "r13", "r14", "r15", "memory");
    }
    for (int i = 0; i < 4; i++) CHECK(gin[i] == gout[i], "r%d differs", 12 + i);
    CHECK((mxcsr_out & 0x6000) == 0x6000, "mxcsr %#x", mxcsr_out);
    return finish();
}
