/* A fanotify group with an event not read yet: refused at dump (events cannot be copied
 * without consuming them), naming the fd and fanotify; the program runs on and reads it. */
#include "fidelity.h"
#include <poll.h>
#include <sys/fanotify.h>

int main(void) {
    fid_init();
    close(open("watched", O_CREAT | O_RDWR, 0600));
    int g = fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK, O_RDONLY);
    if (g != 3 || fanotify_mark(g, FAN_MARK_ADD, FAN_MODIFY, AT_FDCWD, "watched")) {
        printf("FAIL fanotify: fd %d, %s\n", g, strerror(errno));
        return 2;
    }
    int w = open("watched", O_WRONLY);
    write(w, "x", 1);
    close(w);
    struct pollfd p = {g, POLLIN, 0};
    CHECK(poll(&p, 1, 5000) == 1, "no event queued");
    ready();
    wait_go();
    char buf[4096];
    ssize_t n = read(g, buf, sizeof buf);
    struct fanotify_event_metadata *m = (void *)buf;
    CHECK(n > 0 && FAN_EVENT_OK(m, n) && (m->mask & FAN_MODIFY), "the event is gone: %zd", n);
    return finish();
}
