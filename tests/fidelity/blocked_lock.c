/* Frozen while waiting for locks another process (the driver) holds: a POSIX F_SETLKW on a
 * thread and flock(LOCK_EX) on the main thread. After the restore both waits go on (restarted);
 * once the driver lets go, each gets its lock. Prints "waiting" when both are about to block. */
#include "fidelity.h"
#include <pthread.h>
#include <sys/file.h>

static int posix_fd;
static volatile int posix_got;

static void *posix_waiter(void *arg) {
    (void)arg;
    struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 10};
    posix_got = fcntl(posix_fd, F_SETLKW, &l) == 0 ? 1 : -errno;
    return NULL;
}

int main(void) {
    fid_init();
    posix_fd = open("posix.lock", O_RDWR);
    int fd = open("flock.lock", O_RDWR);
    if (posix_fd < 0 || fd < 0) { printf("FAIL open: %s\n", strerror(errno)); return 2; }
    ready();
    pthread_t t;
    pthread_create(&t, NULL, posix_waiter, NULL);
    printf("waiting\n");
    int r = flock(fd, LOCK_EX); /* blocks until the driver unlocks */
    CHECK(r == 0, "flock: %s", strerror(errno));
    pthread_join(t, NULL);
    CHECK(posix_got == 1, "F_SETLKW: %d", posix_got);
    /* Held now: the driver checks with lock_contender before saying go. */
    wait_go();
    return finish();
}
