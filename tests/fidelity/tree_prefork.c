/* A pre-fork server that keeps its listener: the parent binds an AF_UNIX listener, forks two
 * workers that block in accept() on it (one description, inherited) and keeps it open. The
 * driver carries the listener itself (external in all three members) and gives the restored
 * tree one replacement listening socket of its own. After "go" the parent finds the listener's
 * address again (getsockname: the replacement's), three connections to it are each answered
 * by a worker, then a "bye!" to each ends it. Prints "L=<fd>" before READY. */
#include "fidelity.h"
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

static void worker(int l) {
    alarm(60); /* a lost worker does not wait forever */
    for (int n = 0; n < 1000; n++) {
        int c = accept(l, NULL, NULL);
        if (c < 0) continue;
        char q[4] = {0};
        read(c, q, 4);
        pid_t me = getpid();
        write(c, &me, sizeof me);
        close(c);
        if (memcmp(q, "bye!", 4) == 0) _exit(0);
    }
    _exit(1);
}

/* One connection: sends `q`, returns the pid of the worker that answered (0: none). */
static pid_t ask(struct sockaddr_un *a, socklen_t len, const char *q) {
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    pid_t who = 0;
    if (connect(c, (struct sockaddr *)a, len) != 0 || write(c, q, 4) != 4 || read(c, &who, sizeof who) != sizeof who)
        who = 0;
    close(c);
    return who;
}

int main(void) {
    fid_init();
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    getcwd(a.sun_path, sizeof a.sun_path - 8);
    strcat(a.sun_path, "/sock");
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 8)) { printf("FAIL listen\n"); return 1; }
    pid_t w[2];
    for (int i = 0; i < 2; i++) {
        w[i] = fork();
        if (w[i] == 0) worker(l);
    }
    msleep(50); /* the workers block in accept */
    printf("L=%d\n", l);
    ready();
    wait_go();
    struct sockaddr_un now = {0};
    socklen_t len = sizeof now;
    CHECK(getsockname(l, (struct sockaddr *)&now, &len) == 0 && now.sun_family == AF_UNIX, "getsockname");
    CHECK(strcmp(now.sun_path, a.sun_path) != 0, "still the old listener: %s", now.sun_path);
    int answered = 0;
    for (int i = 0; i < 3; i++) {
        pid_t who = ask(&now, len, "who?");
        answered += who == w[0] || who == w[1];
    }
    CHECK(answered == 3, "%d of 3 connections answered by a worker", answered);
    pid_t gone[2] = {ask(&now, len, "bye!"), ask(&now, len, "bye!")}; /* each worker ends after one */
    CHECK(gone[0] && gone[1] && gone[0] != gone[1], "bye answered by %d and %d", gone[0], gone[1]);
    for (int i = 0; i < 2; i++) {
        int st = 0;
        CHECK(waitpid(w[i], &st, 0) == w[i] && WIFEXITED(st) && WEXITSTATUS(st) == 0, "worker %d: %#x", i, st);
    }
    return finish();
}
