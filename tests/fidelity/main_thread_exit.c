/* The main thread calls pthread_exit while two threads run on: the thread-group leader is a
 * zombie (its /proc/PID/maps, fd, … are gone) and the process lives in threads A and B. After
 * the restore: the same pid and tids, the leader a zombie again and the only thread gone, A and
 * B carrying on with their pipe, their file offset, their shared and private memory; then A
 * ends with pthread_exit and B, the last thread, chooses the process's exit status (42 on PASS),
 * which the parent must see. */
#include "fidelity.h"
#include <dirent.h>
#include <pthread.h>
#include <sys/mman.h>

static pid_t pid0, tid_a, tid_b;
static int pfd[2];   /* A writes a byte each round, B reads them */
static int filefd;   /* written "hello" before the dump: offset 5 */
static volatile long *shm; /* MAP_SHARED: [0] A's rounds, [1] A running, [2] go seen, [3] A may end */
static volatile long heap_rounds; /* private memory, shared by the threads */

/* The leader's State and Threads lines, from its own /proc/PID/status. */
static void leader_status(char *state, int *threads) {
    char path[64], st[2048] = "";
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid0);
    int fd = open(path, O_RDONLY);
    if (fd >= 0) { read(fd, st, sizeof st - 1); close(fd); }
    char *s = strstr(st, "State:\t");
    state[0] = s ? s[7] : '?';
    char *t = strstr(st, "Threads:\t");
    *threads = t ? atoi(t + 9) : -1;
}

/* The tids in /proc/self/task, sorted, into v (at most n); returns how many. */
static int task_ids(pid_t *v, int n) {
    DIR *d = opendir("/proc/self/task");
    int k = 0;
    struct dirent *e;
    while (d && (e = readdir(d)) && k < n)
        if (e->d_name[0] != '.') v[k++] = atoi(e->d_name);
    if (d) closedir(d);
    for (int i = 0; i < k; i++)
        for (int j = i + 1; j < k; j++)
            if (v[j] < v[i]) { pid_t x = v[i]; v[i] = v[j]; v[j] = x; }
    return k;
}

static void *thread_a(void *arg) {
    (void)arg;
    pid_t mine = gettid();
    tid_a = mine;
    shm[1] = 1;
    for (int i = 0; i < 60000 && !shm[3]; i++) {
        write(pfd[1], "a", 1);
        shm[0]++;
        heap_rounds++;
        msleep(1);
    }
    if (!shm[3]) { printf("FAIL A was never told to end\n"); exit(4); }
    CHECK(gettid() == mine, "A's tid %d, was %d", (int)gettid(), (int)mine);
    CHECK(getpid() == pid0, "pid %d, was %d", (int)getpid(), (int)pid0);
    pthread_exit(NULL);
}

static void *thread_b(void *arg) {
    (void)arg;
    pid_t mine = gettid();
    tid_b = mine;
    char state = '?';
    int threads = 0;
    for (int i = 0; i < 5000 && !(shm[1] && state == 'Z'); i++) { /* until main has exited */
        msleep(1);
        leader_status(&state, &threads);
    }
    if (state != 'Z' || !shm[1]) { printf("FAIL setup: the main thread did not exit\n"); exit(2); }
    pid_t before[8];
    int nbefore = task_ids(before, 8);
    ready();
    char buf[256];
    long got = 0;
    for (int i = 0; i < 30000; i++) { /* wait_go, draining A's pipe meanwhile */
        if (go_received()) { shm[2] = 1; break; }
        ssize_t n = read(pfd[0], buf, sizeof buf);
        if (n > 0) got += n;
        msleep(1);
    }
    if (!shm[2]) { printf("FAIL no go within 30 s\n"); exit(3); }

    CHECK(gettid() == mine, "B's tid %d, was %d", (int)gettid(), (int)mine);
    CHECK(getpid() == pid0, "pid %d, was %d", (int)getpid(), (int)pid0);
    leader_status(&state, &threads);
    CHECK(state == 'Z', "the leader's state is %c, not Z (zombie)", state);
    CHECK(threads == 3, "Threads: %d, not 3 (the zombie leader counts)", threads);
    pid_t after[8];
    int nafter = task_ids(after, 8);
    CHECK(nafter == 3 && nbefore == 3, "%d tasks after, %d before", nafter, nbefore);
    for (int i = 0; i < nafter && i < nbefore; i++)
        CHECK(after[i] == before[i], "task %d: tid %d, was %d", i, (int)after[i], (int)before[i]);
    CHECK(after[0] == pid0, "the leader %d is not listed first (%d)", (int)pid0, (int)after[0]);

    /* A runs on: its rounds go on in shared and private memory, its bytes come through the pipe. */
    long r0 = shm[0], h0 = heap_rounds, got0 = got;
    for (int i = 0; i < 5000 && (shm[0] < r0 + 5 || heap_rounds < h0 + 5 || got < got0 + 5); i++) {
        ssize_t n = read(pfd[0], buf, sizeof buf);
        if (n > 0) got += n;
        msleep(1);
    }
    CHECK(shm[0] >= r0 + 5, "A's rounds in shared memory stuck at %ld", shm[0]);
    CHECK(heap_rounds >= h0 + 5, "A's rounds in private memory stuck at %ld", heap_rounds);
    CHECK(got >= got0 + 5, "A's bytes through the pipe stuck at %ld", got);
    CHECK(lseek(filefd, 0, SEEK_CUR) == 5, "file offset %ld, not 5", (long)lseek(filefd, 0, SEEK_CUR));
    CHECK(write(filefd, " world", 6) == 6, "write to the file: %s", strerror(errno));
    char f[16] = "";
    CHECK(pread(filefd, f, 11, 0) == 11 && !memcmp(f, "hello world", 11), "file holds %.11s", f);

    /* A ends (a thread's exit), B is the last thread: its exit status is the process's. */
    shm[3] = 1;
    pid_t left[8];
    int nleft = 3;
    for (int i = 0; i < 5000 && (nleft = task_ids(left, 8)) > 2; i++) msleep(1);
    CHECK(nleft == 2, "%d tasks left after A's pthread_exit", nleft);
    leader_status(&state, &threads);
    CHECK(state == 'Z' && threads == 2, "after A ended: leader %c, Threads: %d", state, threads);
    exit(finish() == 0 ? 42 : 1);
}

int main(void) {
    fid_init();
    pid0 = getpid();
    shm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED || pipe2(pfd, O_NONBLOCK) != 0) { printf("FAIL setup: %s\n", strerror(errno)); return 2; }
    filefd = open("data", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (filefd < 0 || write(filefd, "hello", 5) != 5) { printf("FAIL setup: data: %s\n", strerror(errno)); return 2; }
    pthread_t a, b;
    pthread_create(&a, NULL, thread_a, NULL);
    pthread_create(&b, NULL, thread_b, NULL);
    pthread_exit(NULL);
}
