/* Common part of the fidelity programs (dvk checkpoint engine).
 *
 * Protocol with the driver (tests/tests/fidelity.rs): the program runs in its own directory,
 * stdout and stderr are files there. It sets up its state, prints "READY" and then keeps using
 * that state until the driver writes one byte into the FIFO "ctl" (after the dump and the
 * restore). Then it checks its state and prints "PASS" or "FAIL <why>" and exits (0 on PASS). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int ctl_fd = -1;

static __attribute__((unused)) void fid_init(void) {
    syscall(SYS_close_range, 3, ~0U, 0); /* nothing inherited from the test harness */
    setvbuf(stdout, NULL, _IONBF, 0);
}

static __attribute__((unused)) void open_ctl(void) {
    if (ctl_fd < 0) ctl_fd = open("ctl", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (ctl_fd < 0) { printf("FAIL open ctl: %s\n", strerror(errno)); exit(2); }
}

static __attribute__((unused)) void ready(void) {
    open_ctl();
    printf("READY\n");
}

/* Non-blocking: has the driver said go? */
static __attribute__((unused)) int go_received(void) {
    char c;
    return read(ctl_fd, &c, 1) == 1;
}

static __attribute__((unused)) void msleep(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
}

/* Waits for go, sleeping; a deadline keeps a lost program from running forever. */
static __attribute__((unused)) void wait_go(void) {
    for (int i = 0; i < 30000; i++) {
        if (go_received()) return;
        msleep(1);
    }
    printf("FAIL no go within 30 s\n");
    exit(3);
}

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); failures++; } } while (0)

static __attribute__((unused)) int finish(void) {
    if (failures) { printf("FAILED %d checks\n", failures); return 1; }
    printf("PASS\n");
    return 0;
}
