/* fork() from several threads at once (issue 9, item 6): every child must see for itself
 * the PID fork() returned to its parent.
 *
 * Usage: fork_threads THREADS FORKS
 * Each of THREADS threads forks FORKS children one after the other; each child writes its
 * getpid() to a pipe and exits; the parent compares it with what fork() returned.
 * Prints "total T mismatched M virtual V" (V: fork results that are vPIDs) and exits 0.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define VPID_BASE (1 << 22)

static int forks_per_thread;
static int total, mismatched, virtual_pids;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void *worker(void *arg) {
    (void)arg;
    int t = 0, bad = 0, virt = 0;
    for (int i = 0; i < forks_per_thread; i++) {
        int p[2];
        if (pipe(p) != 0) exit(2);
        pid_t pid = fork();
        if (pid < 0) exit(3);
        if (pid == 0) {
            pid_t me = getpid();
            (void)!write(p[1], &me, sizeof me);
            _exit(0);
        }
        close(p[1]);
        pid_t says = -1;
        if (read(p[0], &says, sizeof says) != sizeof says) says = -1;
        close(p[0]);
        int st;
        if (waitpid(pid, &st, 0) != pid) bad++;
        t++;
        if (says != pid) {
            bad++;
            fprintf(stderr, "fork returned %d, the child says %d\n", pid, says);
        }
        if (pid >= VPID_BASE) virt++;
    }
    pthread_mutex_lock(&lock);
    total += t;
    mismatched += bad;
    virtual_pids += virt;
    pthread_mutex_unlock(&lock);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: fork_threads THREADS FORKS\n");
        return 2;
    }
    int threads = atoi(argv[1]);
    forks_per_thread = atoi(argv[2]);
    if (threads < 1 || threads > 64 || forks_per_thread < 1) return 2;
    pthread_t tid[64];
    for (int i = 0; i < threads; i++)
        if (pthread_create(&tid[i], NULL, worker, NULL) != 0) return 4;
    for (int i = 0; i < threads; i++) pthread_join(tid[i], NULL);
    printf("total %d mismatched %d virtual %d\n", total, mismatched, virtual_pids);
    return 0;
}
