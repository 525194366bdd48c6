/* A process to dump and check on (issue 9, item 7): is it still running as it was?
 *
 * A worker thread ticks in a nanosleep loop (a restart-block system call when interrupted);
 * the main thread polls in nanosleep too. On each SIGUSR1 it appends one line to stdout (a regular
 * file: a dump refuses pipes to other processes):
 *   "n=N mask=M vdso=ok|BAD ticks=T"
 * N counts the SIGUSR1 answered, M is the main thread's signal mask (0 as started), vdso=ok if
 * the vDSO still begins with its ELF magic (the dumper patches its code there), T the worker's
 * ticks. An interrupted or killed dumper must leave all of that as it was.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long ticks;

static void *worker(void *arg) {
    (void)arg;
    /* SIGUSR1 is for the main thread. */
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    struct timespec ts = {0, 1000000};
    for (;;) {
        nanosleep(&ts, NULL);
        ticks++;
    }
    return NULL;
}

static volatile sig_atomic_t asked;
static void on_usr1(int sig) {
    (void)sig;
    asked = 1;
}

int main(void) {
    /* Only stdin/out/err: an fd inherited from whoever ran the test would block the dump. */
    syscall(SYS_close_range, 3, ~0U, 0);
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0) return 2;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    const unsigned char *vdso = (const unsigned char *)getauxval(AT_SYSINFO_EHDR);
    unsigned long n = 0;
    printf("ready\n");
    fflush(stdout);
    struct timespec tick = {0, 2000000};
    for (;;) {
        /* Not pause(): a SIGUSR1 that lands just before it would be lost until the next one. */
        nanosleep(&tick, NULL);
        if (!asked) continue;
        asked = 0;
        sigset_t cur;
        pthread_sigmask(SIG_SETMASK, NULL, &cur);
        unsigned long mask = 0;
        for (int s = 1; s < 64; s++)
            if (sigismember(&cur, s) == 1) mask |= 1UL << (s - 1);
        int ok = vdso && memcmp(vdso, "\177ELF", 4) == 0;
        n++;
        printf("n=%lu mask=%lx vdso=%s ticks=%lu\n", n, mask, ok ? "ok" : "BAD", ticks);
        fflush(stdout);
    }
}
