/* pty pairs held inside the process: a canonical pair (its slave held through two
 * descriptions, one non-blocking; settings changed: erase, intr, speed, IUTF8, no echo; window
 * size; exclusive mode) with unread input — two complete lines, one ended by VEOF, and an
 * unfinished line, with an erase and a kill character typed after VLNEXT — and unread output
 * (written with ONLCR: "\r\n"; 10 KB, more than a line discipline holds); and a raw pair in
 * packet mode, locked, whose slave keeps ISIG and ICRNL on, with unread data both ways. After
 * restore: each master and its slave are one pair, settings, size and modes as before, and
 * every unread byte reads back exactly, line by line; the unfinished line is finished by more
 * input. */
#include "fidelity.h"
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <termios.h>

static int same_termios(const struct termios *a, const struct termios *b) {
    return a->c_iflag == b->c_iflag && a->c_oflag == b->c_oflag && a->c_cflag == b->c_cflag &&
           a->c_lflag == b->c_lflag && !memcmp(a->c_cc, b->c_cc, sizeof a->c_cc) &&
           cfgetispeed(a) == cfgetispeed(b) && cfgetospeed(a) == cfgetospeed(b);
}

/* Reads once from fd after waiting (bounded) for it to be readable; -1 if it never was. */
static ssize_t read_ready(int fd, char *buf, size_t len) {
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, 5000) != 1) return -1;
    return read(fd, buf, len);
}

/* The pty number of a slave fd (Unix98: major 136 + n / 256, minor n % 256). */
static int pts_of(int fd) {
    struct stat st;
    if (fstat(fd, &st)) return -1;
    return (major(st.st_rdev) - 136) * 256 + minor(st.st_rdev);
}

int main(void) {
    fid_init();
    /* Pair A: canonical. */
    int ma = posix_openpt(O_RDWR | O_NOCTTY);
    grantpt(ma);
    unlockpt(ma);
    int sa = open(ptsname(ma), O_RDWR | O_NOCTTY);
    int sa2 = open(ptsname(ma), O_RDONLY | O_NOCTTY | O_NONBLOCK);
    struct termios ta;
    tcgetattr(sa, &ta);
    ta.c_cc[VERASE] = 0x08;
    ta.c_cc[VINTR] = 0x01;
    ta.c_lflag &= ~(ECHO | ECHOE | ECHOK);
    ta.c_iflag |= IUTF8;
    cfsetspeed(&ta, B9600);
    tcsetattr(sa, TCSANOW, &ta);
    struct winsize wa = {33, 101, 640, 480};
    ioctl(ma, TIOCSWINSZ, &wa);
    ioctl(sa, TIOCEXCL);
    /* Pair B: raw, packet mode, locked. */
    int mb = posix_openpt(O_RDWR | O_NOCTTY | O_NONBLOCK);
    grantpt(mb);
    unlockpt(mb);
    int sb = open(ptsname(mb), O_RDWR | O_NOCTTY);
    struct termios tb;
    tcgetattr(sb, &tb);
    cfmakeraw(&tb);
    tb.c_lflag |= ISIG;
    tb.c_iflag |= ICRNL;
    tcsetattr(sb, TCSANOW, &tb);
    int one = 1;
    ioctl(mb, TIOCPKT, &one);
    ioctl(mb, TIOCSPTLCK, &one);
    struct termios t0[4];
    tcgetattr(ma, &t0[0]);
    tcgetattr(sa, &t0[1]);
    tcgetattr(mb, &t0[2]);
    tcgetattr(sb, &t0[3]);
    int fl[5] = {fcntl(ma, F_GETFL), fcntl(sa, F_GETFL), fcntl(sa2, F_GETFL), fcntl(mb, F_GETFL), fcntl(sb, F_GETFL)};

    /* Unread data: input typed on the masters, output written by the slaves. */
    /* (an erase and a kill character typed after VLNEXT, ^V, are data) */
    const char in_a[] = "li\x16\x08ne one\nline two\neofline\x04pa\x16\x15rt";
    write(ma, in_a, sizeof in_a - 1);
    write(sa, "from slave\n", 11);
    /* More output than a line discipline holds (4 KiB): the rest waits in the kernel's buffer. */
    static char big[10000];
    for (int i = 0; i < 10000; i++) big[i] = i % 100 == 99 ? '\n' : 'a' + i / 100 % 26;
    CHECK(write(sa, big, sizeof big) == sizeof big, "writing 10000 bytes");
    write(mb, "in\rB", 4);
    write(sb, "bout", 4);
    ready();
    wait_go();

    int fds[4] = {ma, sa, mb, sb};
    for (int i = 0; i < 4; i++) {
        struct termios t;
        CHECK(tcgetattr(fds[i], &t) == 0 && same_termios(&t, &t0[i]), "settings of end %d", i);
    }
    int now[5] = {fcntl(ma, F_GETFL), fcntl(sa, F_GETFL), fcntl(sa2, F_GETFL), fcntl(mb, F_GETFL), fcntl(sb, F_GETFL)};
    CHECK(!memcmp(fl, now, sizeof fl), "status flags");
    int n = -1;
    CHECK(ioctl(ma, TIOCGPTN, &n) == 0 && n == pts_of(sa) && n == pts_of(sa2), "pair A: master %d, slaves %d %d", n,
          pts_of(sa), pts_of(sa2));
    CHECK(ioctl(mb, TIOCGPTN, &n) == 0 && n == pts_of(sb), "pair B: master %d, slave %d", n, pts_of(sb));
    struct winsize w;
    CHECK(ioctl(sa, TIOCGWINSZ, &w) == 0 && w.ws_row == 33 && w.ws_col == 101 && w.ws_xpixel == 640 &&
              w.ws_ypixel == 480, "window size %dx%d", w.ws_row, w.ws_col);
    int v = -1;
    CHECK(ioctl(sa, TIOCGEXCL, &v) == 0 && v == 1, "exclusive %d", v);
    CHECK(ioctl(ma, TIOCGPKT, &v) == 0 && v == 0, "A packet %d", v);
    CHECK(ioctl(mb, TIOCGPKT, &v) == 0 && v == 1, "B packet %d", v);
    CHECK(ioctl(mb, TIOCGPTLCK, &v) == 0 && v == 1, "B locked %d", v);
    CHECK(ioctl(ma, TIOCGPTLCK, &v) == 0 && v == 0, "A locked %d", v);

    /* Pair A's input, line by line; the unfinished line waits for its end. */
    char b[256];
    ssize_t r = read(sa2, b, sizeof b);
    CHECK(r == 10 && !memcmp(b, "li\x08ne one\n", 10), "line 1: %zd", r);
    r = read(sa2, b, sizeof b);
    CHECK(r == 9 && !memcmp(b, "line two\n", 9), "line 2: %zd", r);
    r = read(sa2, b, sizeof b);
    CHECK(r == 7 && !memcmp(b, "eofline", 7), "line ended by VEOF: %zd", r);
    r = read(sa2, b, sizeof b);
    CHECK(r == -1 && errno == EAGAIN, "the unfinished line reads early: %zd", r);
    write(ma, "ial\n", 4);
    r = read_ready(sa2, b, sizeof b);
    CHECK(r == 9 && !memcmp(b, "pa\x15rtial\n", 9), "finished line: %zd '%.*s'", r, (int)(r > 0 ? r : 0), b);
    /* Pair A's output as the slave's output processing made it. */
    static char out[16384];
    size_t got = 0;
    for (int i = 0; i < 1000 && got < 12 + 10100; i++) {
        r = read_ready(ma, out + got, sizeof out - got);
        if (r <= 0) break;
        got += r;
    }
    CHECK(got == 12 + 10100 && !memcmp(out, "from slave\r\n", 12), "A output: %zu bytes", got);
    for (int i = 0, o = 12; got == 12 + 10100 && i < 10000; i++) {
        if (big[i] == '\n') {
            if (out[o] != '\r' || out[o + 1] != '\n') { CHECK(0, "line end at %d", o); break; }
            o += 2;
        } else if (out[o++] != big[i]) { CHECK(0, "byte %d", o - 1); break; }
    }
    struct pollfd p = {ma, POLLIN, 0};
    CHECK(poll(&p, 1, 0) == 0, "more output on A");
    /* Pair B: input as its input processing stored it, output behind the packet-mode byte. */
    r = read_ready(sb, b, sizeof b);
    CHECK(r == 4 && !memcmp(b, "in\nB", 4), "B input: %zd (%s)", r, strerror(errno));
    r = read_ready(mb, b, sizeof b);
    CHECK(r == 5 && !memcmp(b, "\0bout", 5), "B output: %zd", r);
    /* Both pairs still carry data. */
    write(sa, "again\n", 6);
    r = read_ready(ma, b, sizeof b);
    CHECK(r == 7 && !memcmp(b, "again\r\n", 7), "A output after: %zd", r);
    /* Last: a refused open of a locked slave sets TTY_IO_ERROR on the open one too. */
    CHECK(open(ptsname(mb), O_RDWR | O_NOCTTY) == -1 && errno == EIO, "B's slave opens though locked");
    return finish();
}
