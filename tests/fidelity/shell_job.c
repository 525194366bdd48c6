/* A job of an interactive shell (`dump --shell-job`, `restore --shell-job`).
 *
 * Run without arguments it stands in for the shell: a new session whose controlling terminal
 * is $PTS, and a job in its own process group in the foreground, with the terminal as stdin
 * and stderr (stdout stays the driver's file). The job ("job" argument) makes its terminal
 * raw-ish, as an interactive program does, and waits. After a restore by `migrate-cli restore
 * --shell-job` on another terminal (its path in the file "newtty"), the job checks that its
 * stdin and stderr are that terminal, that it is its controlling terminal and it is in the
 * foreground, that its settings came along, reads a key typed there and writes to it, also
 * through an fd it opened as /dev/tty. */
#include "fidelity.h"
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>

static int shell(char *self) {
    setsid();
    int t = open(getenv("PTS"), O_RDWR); /* the session leader's first terminal: its ctty */
    if (t < 0) { printf("FAIL open %s: %s\n", getenv("PTS"), strerror(errno)); return 2; }
    pid_t c = fork();
    if (c == 0) {
        setpgid(0, 0);
        tcsetpgrp(t, getpid());
        dup2(t, 0);
        dup2(t, 2);
        close(t);
        execl("/proc/self/exe", self, "job", (char *)NULL);
        _exit(127);
    }
    setpgid(c, c);
    tcsetpgrp(t, c);
    int st;
    waitpid(c, &st, 0); /* killed by the dump */
    for (int i = 0; i < 600; i++) sleep(1); /* the session lives on until the driver ends it */
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return shell(argv[0]);
    fid_init();
    struct termios t;
    tcgetattr(0, &t);
    t.c_lflag &= ~(ICANON | ECHO);
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    t.c_cc[VINTR] = 0x02;
    tcsetattr(0, TCSANOW, &t);
    struct termios before;
    tcgetattr(0, &before);
    for (int i = 0; i < 1000 && tcgetpgrp(0) != getpgrp(); i++) msleep(1); /* the shell's tcsetpgrp */
    int tty = open("/dev/tty", O_WRONLY); /* the controlling terminal, by its generic name */
    if (tty != 3) { dup2(tty, 3); close(tty); }
    CHECK(tcgetpgrp(0) == getpgrp(), "not in the foreground before the dump");
    ready();
    wait_go();

    char want[64] = {0};
    FILE *f = fopen("newtty", "r");
    if (f) { fscanf(f, "%63s", want); fclose(f); }
    CHECK(isatty(0) && isatty(2), "stdin/stderr are not terminals");
    CHECK(ttyname(0) && !strcmp(ttyname(0), want), "stdin is %s, not %s", ttyname(0) ? ttyname(0) : "?", want);
    CHECK(ttyname(2) && !strcmp(ttyname(2), want), "stderr is %s", ttyname(2) ? ttyname(2) : "?");
    int ctty = open("/dev/tty", O_RDWR);
    CHECK(ctty >= 0, "no controlling terminal: %s", strerror(errno));
    CHECK(tcgetpgrp(0) == getpgrp(), "not the terminal's foreground group (%d, ours %d)", tcgetpgrp(0), getpgrp());
    struct termios now;
    CHECK(tcgetattr(0, &now) == 0 && now.c_lflag == before.c_lflag && now.c_iflag == before.c_iflag &&
              now.c_oflag == before.c_oflag && !memcmp(now.c_cc, before.c_cc, sizeof now.c_cc),
          "terminal settings: lflag %o, was %o", now.c_lflag, before.c_lflag);
    char c = 0;
    CHECK(read(0, &c, 1) == 1 && c == 'x', "read '%c' from the terminal (%s)", c, strerror(errno));
    char link[64] = {0};
    CHECK(readlink("/proc/self/fd/3", link, sizeof link - 1) > 0 && !strcmp(link, "/dev/tty"), "fd 3 is %s", link);
    CHECK((fcntl(3, F_GETFL) & O_ACCMODE) == O_WRONLY, "fd 3 flags %o", fcntl(3, F_GETFL));
    CHECK(write(3, "via tty\n", 8) == 8, "write to /dev/tty: %s", strerror(errno));
    CHECK(write(2, "hello\n", 6) == 6, "write to the terminal: %s", strerror(errno));
    return finish();
}
