/* A pty slave ($PTS) whose master another process (the driver) holds: refused at dump,
 * naming the fd, the pty and the holder; the program runs on and still writes to it. */
#include "fidelity.h"

int main(void) {
    fid_init();
    int s = open(getenv("PTS"), O_RDWR | O_NOCTTY);
    if (s != 3) { printf("FAIL open %s: fd %d\n", getenv("PTS"), s); return 2; }
    ready();
    wait_go();
    CHECK(write(3, "still\n", 6) == 6, "write: %s", strerror(errno));
    return finish();
}
