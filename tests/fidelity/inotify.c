/* inotify: watches at descriptors 1, 3 and 4 (2 removed), with their masks (IN_ONESHOT too);
 * after restore the same descriptors report the same events, the removal of the gap leaves no
 * event behind, and the next watch gets descriptor 5. */
#include "fidelity.h"
#include <sys/inotify.h>
#include <sys/stat.h>

static char buf[8192] __attribute__((aligned(8)));

int main(void) {
    fid_init();
    mkdir("w1", 0700);
    mkdir("w2", 0700);
    close(open("f", O_CREAT | O_WRONLY, 0600));
    int in = inotify_init1(IN_NONBLOCK);
    int w1 = inotify_add_watch(in, "w1", IN_CREATE);
    int gap = inotify_add_watch(in, "w2", IN_CREATE);
    inotify_rm_watch(in, gap);
    int wf = inotify_add_watch(in, "f", IN_MODIFY | IN_ONESHOT);
    int w2 = inotify_add_watch(in, "w2", IN_DELETE | IN_CREATE);
    while (read(in, buf, sizeof buf) > 0) {} /* the IN_IGNORED of the gap */
    if (w1 != 1 || gap != 2 || wf != 3 || w2 != 4) { printf("FAIL setup %d %d %d %d\n", w1, gap, wf, w2); return 1; }
    ready();
    wait_go();
    CHECK(read(in, buf, sizeof buf) == -1 && errno == EAGAIN, "events queued after restore");
    CHECK(fcntl(in, F_GETFL) & O_NONBLOCK, "O_NONBLOCK lost");
    close(open("w1/x", O_CREAT | O_WRONLY, 0600));
    int fd = open("f", O_WRONLY);
    write(fd, "a", 1);
    write(fd, "b", 1); /* IN_ONESHOT: one IN_MODIFY, then IN_IGNORED */
    close(fd);
    close(open("w2/y", O_CREAT | O_WRONLY, 0600));
    unlink("w2/y");
    int want_wd[] = {1, 3, 3, 4, 4};
    unsigned want_mask[] = {IN_CREATE, IN_MODIFY, IN_IGNORED, IN_CREATE, IN_DELETE};
    const char *want_name[] = {"x", "", "", "y", "y"};
    int k = 0;
    ssize_t n = read(in, buf, sizeof buf);
    for (char *p = buf; n > 0 && p < buf + n;) {
        struct inotify_event *e = (struct inotify_event *)p;
        if (k < 5) {
            CHECK(e->wd == want_wd[k] && e->mask == want_mask[k] &&
                      strcmp(e->len ? e->name : "", want_name[k]) == 0,
                  "event %d: wd %d mask %x name %s", k, e->wd, e->mask, e->len ? e->name : "");
        }
        k++;
        p += sizeof *e + e->len;
    }
    CHECK(k == 5, "%d events", k);
    int w3 = inotify_add_watch(in, ".", IN_CREATE);
    CHECK(w3 == 5, "next watch descriptor %d", w3);
    return finish();
}
