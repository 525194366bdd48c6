/* What VmFlags records about a mapping beyond its protection comes back: mlock (lo) and
 * mlock2(MLOCK_ONFAULT) (lf); madvise DONTFORK (dc), DONTDUMP (dd), WIPEONFORK (wf), HUGEPAGE
 * (hg), NOHUGEPAGE (nh), MERGEABLE (mg), RANDOM (rr), SEQUENTIAL (sr); MAP_NORESERVE (nr); mseal
 * (sl); MAP_DROPPABLE (dp, glibc's getrandom state); guard pages (MADV_GUARD_INSTALL, seen in
 * pagemap) in private and shared memory; an anonymous mapping's name; a MAP_GROWSDOWN mapping that is not the main stack still
 * grows; a shared file mapping that was read-only (its O_RDWR fd closed) can still be made
 * writable with mprotect. Each is checked from /proc/self/smaps and by using it. */
#include "fidelity.h"
#include <setjmp.h>
#include <sys/mman.h>
#include <sys/prctl.h>

#define PG 4096

/* The VmFlags line (and the name) of the mapping holding addr. */
static int vmflags(void *addr, char *flags, size_t n, char *name, size_t nn) {
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    int in = 0, found = 0;
    unsigned long a = (unsigned long)addr;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long s, e;
        char perms[8];
        int off = 0;
        if (sscanf(line, "%lx-%lx %7s %*s %*s %*s%n", &s, &e, perms, &off) == 3) { /* a mapping's first line */
            in = a >= s && a < e;
            if (in && name) {
                char *p = line + off;
                while (*p == ' ') p++;
                snprintf(name, nn, "%s", p);
                name[strcspn(name, "\n")] = 0;
            }
        } else if (in && !strncmp(line, "VmFlags:", 8)) {
            snprintf(flags, n, "%s", line + 8);
            found = 1;
            in = 0;
        }
    }
    if (f) fclose(f);
    return found;
}

static int has(void *addr, const char *fl) {
    char flags[256] = "", want[8];
    vmflags(addr, flags, sizeof flags, NULL, 0);
    snprintf(want, sizeof want, " %s", fl);
    return strstr(flags, want) != NULL;
}

static char *anon(int pages, int extra) {
    char *p = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | extra, -1, 0);
    if (p == MAP_FAILED) { printf("FAIL mmap: %s\n", strerror(errno)); exit(2); }
    memset(p, 'v', pages * PG);
    return p;
}

static sigjmp_buf jb;
static void segv(int s) { (void)s; siglongjmp(jb, 1); }

static int touch(volatile char *p) {
    signal(SIGSEGV, segv);
    int ok = 0;
    if (sigsetjmp(jb, 1) == 0) { *p = 'g'; ok = *p == 'g'; }
    signal(SIGSEGV, SIG_DFL);
    return ok;
}

int main(void) {
    fid_init();
    /* Separate mappings with a PROT_NONE page between them so none merges with another. */
    struct { const char *flag; char *p; } m[16];
    int k = 0;
    char *locked = anon(4, 0); mlock(locked, 4 * PG); m[k].flag = "lo"; m[k++].p = locked;
    char *onfault = anon(4, 0); syscall(SYS_mlock2, onfault, 4 * PG, 1 /* MLOCK_ONFAULT */); m[k].flag = "lf"; m[k++].p = onfault;
    char *dc = anon(4, 0); madvise(dc, 4 * PG, MADV_DONTFORK); m[k].flag = "dc"; m[k++].p = dc;
    char *dd = anon(4, 0); madvise(dd, 4 * PG, MADV_DONTDUMP); m[k].flag = "dd"; m[k++].p = dd;
    char *wf = anon(4, 0); madvise(wf, 4 * PG, MADV_WIPEONFORK); m[k].flag = "wf"; m[k++].p = wf;
    char *hg = anon(4, 0); madvise(hg, 4 * PG, MADV_HUGEPAGE); m[k].flag = "hg"; m[k++].p = hg;
    char *nh = anon(4, 0); madvise(nh, 4 * PG, MADV_NOHUGEPAGE); m[k].flag = "nh"; m[k++].p = nh;
    char *rr = anon(4, 0); madvise(rr, 4 * PG, MADV_RANDOM); m[k].flag = "rr"; m[k++].p = rr;
    char *sr = anon(4, 0); madvise(sr, 4 * PG, MADV_SEQUENTIAL); m[k].flag = "sr"; m[k++].p = sr;
    char *nr = anon(4, MAP_NORESERVE); m[k].flag = "nr"; m[k++].p = nr;
    char *mg = anon(4, 0);
    if (madvise(mg, 4 * PG, MADV_MERGEABLE) == 0) { m[k].flag = "mg"; m[k++].p = mg; }
    char *sl = anon(1, 0);
    if (syscall(462 /* mseal */, sl, PG, 0) == 0) { m[k].flag = "sl"; m[k++].p = sl; } else sl = NULL;
    char *dp = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, 0x08 /* MAP_DROPPABLE */ | MAP_ANONYMOUS, -1, 0);
    if (dp != MAP_FAILED) { memset(dp, 'v', 2 * PG); m[k].flag = "dp"; m[k++].p = dp; }
    for (int i = 0; i < k; i++)
        if (!has(m[i].p, m[i].flag)) { printf("FAIL setup: no %s before the dump\n", m[i].flag); return 2; }
    char *guarded = anon(3, 0);
    int guard = madvise(guarded + PG, PG, 102 /* MADV_GUARD_INSTALL */) == 0; /* Linux 6.13+ */
    /* Guard pages in shared memory, anonymous and file-backed (Linux 6.15+). */
    char *gsa = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    memset(gsa, 'v', 3 * PG);
    int gfd = open("guarded.bin", O_RDWR | O_CREAT | O_TRUNC, 0600);
    ftruncate(gfd, 3 * PG);
    char *gsf = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, gfd, 0);
    close(gfd);
    memset(gsf, 'v', 3 * PG);
    int guard_shared = madvise(gsa + PG, PG, 102) == 0 && madvise(gsf + PG, PG, 102) == 0;
    char *named = anon(2, 0);
    /* (Kernels without CONFIG_ANON_VMA_NAME refuse to name it: then it is not checked.) */
    int naming = prctl(0x53564d41 /* PR_SET_VMA */, 0 /* PR_SET_VMA_ANON_NAME */, named, 2 * PG, "fid-name") == 0;

    /* A growsdown mapping with two free pages below it, then a PROT_NONE reservation (an
     * inaccessible neighbour needs no guard gap; no other mapping fits in those two pages). */
    char *res = mmap(NULL, 16 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(res + 12 * PG, 4 * PG);
    char *gd = mmap(res + 14 * PG, 2 * PG, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_GROWSDOWN, -1, 0);
    gd[0] = 'G';
    CHECK(touch(gd - PG), "growsdown mapping does not grow before the dump");

    /* A shared file mapping through an O_RDWR fd, read-only for now, fd closed. */
    int fd = open("shared.bin", O_RDWR | O_CREAT | O_TRUNC, 0600);
    char page[PG];
    memset(page, 'f', PG);
    write(fd, page, PG);
    write(fd, page, PG);
    char *sh = mmap(NULL, 2 * PG, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);

    ready();
    wait_go();

    for (int i = 0; i < k; i++) {
        CHECK(has(m[i].p, m[i].flag), "VmFlags %s lost", m[i].flag);
        /* (Droppable memory may be dropped by the kernel at any time: zeros are fine there.) */
        if (strcmp(m[i].flag, "dp")) CHECK(m[i].p[0] == 'v' && m[i].p[PG - 1] == 'v', "data of the %s mapping", m[i].flag);
    }
    CHECK(!has(locked, "lf"), "plain mlock came back as MLOCK_ONFAULT");
    CHECK(!has(dc, "lo"), "an unlocked mapping came back locked");
    if (sl) CHECK(mprotect(sl, PG, PROT_READ) == -1 && errno == EPERM, "sealed page could be mprotect'ed");
    char flags[256], name[256] = "";
    vmflags(named, flags, sizeof flags, name, sizeof name);
    if (naming) CHECK(strcmp(name, "[anon:fid-name]") == 0, "anonymous mapping name: '%s'", name);

    if (guard) {
        CHECK(!touch(guarded + PG), "guard page lost: it can be touched");
        CHECK(guarded[0] == 'v' && guarded[2 * PG] == 'v', "pages around the guard page");
    }
    if (guard_shared) {
        CHECK(!touch(gsa + PG) && !touch(gsf + PG), "guard page in shared memory lost");
        CHECK(gsa[0] == 'v' && gsa[2 * PG] == 'v' && gsf[0] == 'v' && gsf[2 * PG] == 'v', "shared pages around the guard pages");
    }
    CHECK(has(gd, "gd"), "growsdown flag lost");
    CHECK(gd[0] == 'G' && gd[-PG] == 'g', "growsdown data");
    CHECK(touch(gd - 2 * PG), "growsdown mapping no longer grows");

    CHECK(mprotect(sh + PG, PG, PROT_READ | PROT_WRITE) == 0, "mprotect of the shared file mapping: %s", strerror(errno));
    if (touch(sh + PG)) {
        msync(sh, 2 * PG, MS_SYNC);
        int f2 = open("shared.bin", O_RDONLY);
        char c = 0;
        pread(f2, &c, 1, PG);
        close(f2);
        CHECK(c == 'g', "write through the shared mapping did not reach the file");
    } else CHECK(0, "shared file page not writable after mprotect");
    return finish();
}
