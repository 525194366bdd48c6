/* fanotify: a notification group (non-blocking, close-on-exec, FAN_UNLIMITED_QUEUE) with an
 * inode mark on a file (modify, close-write), a mark on a directory for its children (open)
 * with an ignore mask (FAN_MARK_IGNORED_MASK, surviving modification) on one child, and a
 * second plain group with a filesystem mark and a mount mark (ignore masks only: nothing
 * from other processes can queue events). After restore: the fdinfo of both groups reads as before (flags, marks, masks,
 * handles); writing the file queues FAN_MODIFY from us; opening a child of the directory
 * queues FAN_OPEN, opening the ignored one does not. */
#include "fidelity.h"
#include <poll.h>
#include <sys/fanotify.h>

/* The fanotify lines of an fd's fdinfo, concatenated. */
static void marks(int fd, char *out, size_t len) {
    char p[64], line[512];
    snprintf(p, sizeof p, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(p, "r");
    out[0] = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "fanotify", 8)) strncat(out, line, len - strlen(out) - 1);
    if (f) fclose(f);
}

/* Reads events (bounded wait for the first); returns the OR of their masks from our pid. */
static unsigned long long events(int fd) {
    char buf[4096];
    unsigned long long got = 0;
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, 2000) != 1) return 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) {
        for (struct fanotify_event_metadata *m = (void *)buf; FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
            if (m->pid == getpid()) got |= m->mask;
            if (m->fd >= 0) close(m->fd);
        }
    }
    return got;
}

int main(void) {
    fid_init();
    int w = open("watched", O_CREAT | O_RDWR, 0600);
    close(w);
    mkdir("dir", 0700);
    close(open("dir/seen", O_CREAT | O_RDWR, 0600));
    close(open("dir/ignored", O_CREAT | O_RDWR, 0600));
    int g = fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK | FAN_CLOEXEC | FAN_UNLIMITED_QUEUE, O_RDONLY | O_LARGEFILE);
    if (g < 0) { printf("FAIL fanotify_init: %s\n", strerror(errno)); return 2; }
    if (fanotify_mark(g, FAN_MARK_ADD, FAN_MODIFY | FAN_CLOSE_WRITE, AT_FDCWD, "watched") ||
        fanotify_mark(g, FAN_MARK_ADD, FAN_OPEN | FAN_EVENT_ON_CHILD, AT_FDCWD, "dir") ||
        fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_IGNORED_MASK | FAN_MARK_IGNORED_SURV_MODIFY, FAN_OPEN, AT_FDCWD,
                      "dir/ignored")) {
        printf("FAIL fanotify_mark: %s\n", strerror(errno));
        return 2;
    }
    int h = fanotify_init(FAN_CLASS_NOTIF, O_RDONLY);
    /* Ignore masks only: other processes' file activity must not queue events. */
    /* (Surviving modification: any write on the filesystem would clear them.) */
    int ig = FAN_MARK_ADD | FAN_MARK_IGNORED_MASK | FAN_MARK_IGNORED_SURV_MODIFY;
    if (fanotify_mark(h, ig | FAN_MARK_FILESYSTEM, FAN_OPEN, AT_FDCWD, "dir/seen") ||
        fanotify_mark(h, ig | FAN_MARK_MOUNT, FAN_CLOSE_NOWRITE, AT_FDCWD, ".")) {
        printf("FAIL fanotify_mark (h): %s\n", strerror(errno));
        return 2;
    }
    static char before_g[4096], before_h[4096], after[4096];
    marks(g, before_g, sizeof before_g);
    marks(h, before_h, sizeof before_h);
    ready();
    wait_go();
    marks(g, after, sizeof after);
    CHECK(!strcmp(before_g, after), "group 1 fdinfo:\n%s\nwas:\n%s", after, before_g);
    marks(h, after, sizeof after);
    CHECK(!strcmp(before_h, after), "group 2 fdinfo:\n%s\nwas:\n%s", after, before_h);
    CHECK((fcntl(g, F_GETFL) & O_NONBLOCK) && (fcntl(g, F_GETFD) & FD_CLOEXEC), "group 1 flags");
    CHECK(!(fcntl(h, F_GETFL) & O_NONBLOCK) && !(fcntl(h, F_GETFD) & FD_CLOEXEC), "group 2 flags");
    w = open("watched", O_WRONLY);
    write(w, "x", 1);
    close(w);
    unsigned long long m = events(g);
    CHECK((m & FAN_MODIFY) && (m & FAN_CLOSE_WRITE), "events on watched: %llx", m);
    close(open("dir/ignored", O_RDONLY));
    close(open("dir/seen", O_RDONLY));
    m = events(g);
    CHECK(m & FAN_OPEN, "no FAN_OPEN from dir/seen: %llx", m);
    return finish();
}
