#define _GNU_SOURCE
/* A server that shows whether a moved process keeps its identity (tests/tests/move_apps.rs).
 * Listens on PORT (a virtual port under the shim) and prints "listening PID" (PID: getpid()).
 * It serves one connection at a time; per connection, one-line commands, one-line replies:
 *   pid   -> getpid()
 *   fork  -> fork()s a child that exits 7, waitpid()s it:
 *            "<pid fork returned> <pid waitpid returned> <exit status>"
 *   sigs  -> how many SIGUSR1 it has received (handler installed at start)
 *   hold  -> "holding"; once this connection closes it accepts nothing more until it
 *            receives SIGUSR2 (connections meanwhile wait in the listen backlog); it prints
 *            "holding" when it starts waiting and "accepting" when SIGUSR2 came
 *   other -> "unknown"
 * usage: move_identity PORT */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t usr1;
static void on_usr1(int sig) {
    (void)sig;
    usr1++;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= w;
    }
    return 0;
}

/* Serves one connection until EOF; returns 1 when it asked to hold. */
static int serve(int c) {
    char line[256];
    size_t have = 0;
    int hold = 0;
    for (;;) {
        ssize_t r = read(c, line + have, sizeof line - 1 - have);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        have += r;
        char *nl;
        while ((nl = memchr(line, '\n', have))) {
            *nl = 0;
            char out[128];
            if (!strcmp(line, "pid")) {
                snprintf(out, sizeof out, "%d\n", (int)getpid());
            } else if (!strcmp(line, "fork")) {
                pid_t child = fork();
                if (child == 0) _exit(7);
                int st = 0;
                pid_t got;
                do got = waitpid(child, &st, 0);
                while (got < 0 && errno == EINTR);
                snprintf(out, sizeof out, "%d %d %d\n", (int)child, (int)got, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
            } else if (!strcmp(line, "sigs")) {
                snprintf(out, sizeof out, "%d\n", (int)usr1);
            } else if (!strcmp(line, "hold")) {
                hold = 1;
                snprintf(out, sizeof out, "holding\n");
            } else {
                snprintf(out, sizeof out, "unknown\n");
            }
            if (write_all(c, out, strlen(out))) return hold;
            size_t used = nl + 1 - line;
            memmove(line, nl + 1, have - used);
            have -= used;
        }
        if (have == sizeof line - 1) break;
    }
    return hold;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, 0);
    sigset_t usr2;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    sigprocmask(SIG_BLOCK, &usr2, 0);

    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (bind(ls, (void *)&a, sizeof a) || listen(ls, 16)) {
        perror("listen");
        return 1;
    }
    printf("listening %d\n", (int)getpid());
    fflush(stdout);
    for (;;) {
        int c = accept(ls, 0, 0);
        if (c < 0) {
            if (errno == EINTR) continue;
            perror("accept");
            return 1;
        }
        int hold = serve(c);
        close(c);
        if (hold) {
            printf("holding\n");
            fflush(stdout);
            int sig = 0;
            while (sigwait(&usr2, &sig) != 0 || sig != SIGUSR2) {
            }
            printf("accepting\n");
            fflush(stdout);
        }
    }
}
