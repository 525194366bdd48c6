/* Another process looking at a lock (not a fidelity program: run by the driver, prints one line).
 *   lock_contender FILE posix|ofd r|w START LEN   F_GETLK / F_OFD_GETLK for that lock:
 *                                                 "FREE" or "HELD <r|w> <pid> <start> <len>"
 *   lock_contender FILE flock sh|ex               flock(LOCK_NB): "FREE" or "HELD" */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) { printf("usage\n"); return 2; }
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) { printf("ERROR open %s: %s\n", argv[1], strerror(errno)); return 2; }
    if (!strcmp(argv[2], "flock")) {
        int r = flock(fd, (!strcmp(argv[3], "ex") ? LOCK_EX : LOCK_SH) | LOCK_NB);
        printf(r == 0 ? "FREE\n" : errno == EWOULDBLOCK ? "HELD\n" : "ERROR flock\n");
        return 0;
    }
    if (argc < 6) { printf("usage\n"); return 2; }
    struct flock l = {.l_type = argv[3][0] == 'w' ? F_WRLCK : F_RDLCK, .l_whence = SEEK_SET,
                      .l_start = atol(argv[4]), .l_len = atol(argv[5])};
    if (fcntl(fd, !strcmp(argv[2], "ofd") ? F_OFD_GETLK : F_GETLK, &l) != 0) { printf("ERROR getlk: %s\n", strerror(errno)); return 2; }
    if (l.l_type == F_UNLCK) printf("FREE\n");
    else printf("HELD %c %d %ld %ld\n", l.l_type == F_WRLCK ? 'w' : 'r', l.l_pid, (long)l.l_start, (long)l.l_len);
    return 0;
}
