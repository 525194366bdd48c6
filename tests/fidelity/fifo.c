/* FIFOs (named pipes) with unread data: one opened read-only whose writer is gone (data, then
 * EOF), one opened read-write (its own data; a lost copy would make the read wait forever), and
 * a read-only/write-only pair of another FIFO (data, then more written after restore). */
#include "fidelity.h"
#include <poll.h>
#include <sys/stat.h>

static int readable(int fd) {
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, 5000) == 1; /* a bound, not a timing check: data is there or never */
}

int main(void) {
    fid_init();
    mkfifo("f1", 0600);
    mkfifo("f2", 0600);
    mkfifo("f3", 0600);
    int r1 = open("f1", O_RDONLY | O_NONBLOCK);
    int w1 = open("f1", O_WRONLY);
    write(w1, "hello", 5);
    close(w1);
    int rw = open("f2", O_RDWR);
    write(rw, "rw-data", 7);
    int r3 = open("f3", O_RDONLY | O_NONBLOCK);
    int w3 = open("f3", O_WRONLY);
    write(w3, "w3", 2);
    ready();
    wait_go();
    char b[16] = "";
    CHECK(read(r1, b, sizeof b) == 5 && !memcmp(b, "hello", 5), "read-only FIFO data lost");
    CHECK(read(r1, b, sizeof b) == 0, "read-only FIFO without writer: no EOF after the data");
    CHECK((fcntl(r1, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) == (O_RDONLY | O_NONBLOCK), "f1 flags");
    memset(b, 0, sizeof b);
    CHECK(readable(rw) && read(rw, b, sizeof b) == 7 && !memcmp(b, "rw-data", 7), "read-write FIFO data lost");
    CHECK((fcntl(rw, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) == O_RDWR, "f2 flags");
    memset(b, 0, sizeof b);
    CHECK(read(r3, b, sizeof b) == 2 && !memcmp(b, "w3", 2), "FIFO pair data lost");
    CHECK(write(w3, "more", 4) == 4 && readable(r3) && read(r3, b, sizeof b) == 4 && !memcmp(b, "more", 4),
          "FIFO pair does not connect after restore");
    return finish();
}
