/* The main thread opened a TCP listener and called pthread_exit; a thread runs on. The leader's
 * /proc/PID/fd is empty, the fds are judged through the live thread: the dump is refused naming
 * fd 3 and AF_INET (not carried without it), and the process runs on. */
#include "fidelity.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>

static int s = -1;

static void *worker(void *a) {
    (void)a;
    char st[256] = "";
    for (int i = 0; i < 5000 && !strstr(st, "State:\tZ"); i++) { /* until main has exited */
        msleep(1);
        memset(st, 0, sizeof st);
        int fd = open("/proc/self/status", O_RDONLY);
        read(fd, st, sizeof st - 1);
        close(fd);
    }
    if (!strstr(st, "State:\tZ")) { printf("FAIL setup: the main thread did not exit\n"); exit(2); }
    ready();
    wait_go();
    CHECK(fcntl(s, F_GETFD) != -1, "socket gone");
    exit(finish());
}

int main(void) {
    fid_init();
    s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(s, (struct sockaddr *)&a, sizeof a);
    listen(s, 1);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    pthread_exit(NULL);
}
