/* Tries once to reach HOST:PORT and says what happened; used by the tests to
 * wait until an endpoint is known on a node (the server under test discards
 * the probe connection).
 *
 *   net_probe HOST PORT
 *
 * Prints one of "connected", "resolve-failed <gai error>", "connect-failed
 * <errno name> <message>" and exits 0 only for "connected" (after closing).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: net_probe HOST PORT\n");
        return 2;
    }
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(argv[1], argv[2], &hints, &res);
    if (rc != 0) {
        printf("resolve-failed %s\n", gai_strerror(rc));
        return 1;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
        int e = errno;
        printf("connect-failed %s %s\n", e == ECONNREFUSED ? "ECONNREFUSED" : "other", strerror(e));
        return 1;
    }
    close(fd);
    printf("connected\n");
    return 0;
}
