/* Prints what the process sees of its identity, then (optionally) forks and
 * has the child print the same, then runs threads that all call getpid().
 * Finally waits for a line on stdin (or EOF) so the test can inspect `ps`.
 *
 *   identity            print "self vpid=V real=R ppid=P"
 *   identity fork       also "child vpid=V real=R ppid=P" from a fork()ed child
 *   identity threads    also "threads ok" when 8 threads x 10000 getpid() all agree
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t expected;
static void *hammer(void *arg) {
    (void)arg;
    for (int i = 0; i < 10000; i++)
        if (getpid() != expected) return (void *)1;
    return NULL;
}

static void report(const char *who) {
    printf("%s vpid=%d real=%ld ppid=%d\n", who, getpid(), syscall(SYS_getpid), getppid());
    fflush(stdout);
}

static void wait_stdin(void) {
    char line[64];
    (void)!fgets(line, sizeof line, stdin);
}

int main(int argc, char **argv) {
    report("self");
    if (argc > 1 && strcmp(argv[1], "fork") == 0) {
        pid_t child = fork();
        if (child == 0) {
            report("child");
            wait_stdin();
            _exit(0);
        }
        wait_stdin();
        kill(child, SIGTERM); /* a real PID still works as without the shim */
        waitpid(child, NULL, 0);
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "threads") == 0) {
        pthread_t t[8];
        expected = getpid();
        int bad = 0;
        for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, hammer, NULL);
        for (int i = 0; i < 8; i++) {
            void *r;
            pthread_join(t[i], &r);
            bad |= r != NULL;
        }
        printf(bad ? "threads disagree\n" : "threads ok\n");
        fflush(stdout);
    }
    wait_stdin();
    return 0;
}
