/* Files deleted while open: a sparse file (data, a 1 MiB hole, a tail) held by two
 * descriptions (one dup'd, shared offset; one read-only with its own offset), mode 0640; and a
 * deleted file mapped shared (a page written through the mapping) and private (a page changed
 * copy-on-write). After restore: still deleted (nlink 0, "(deleted)" in /proc), same size,
 * data, hole, mode, offsets; the descriptions share the inode; the mappings hold their pages. */
#include "fidelity.h"
#include <sys/mman.h>
#include <sys/stat.h>

#define TAIL_AT (1 << 20)

int main(void) {
    fid_init();
    int a = open("gone.txt", O_RDWR | O_CREAT, 0600);
    write(a, "data", 4);
    pwrite(a, "tail", 4, TAIL_AT);
    fchmod(a, 0640);
    int b = dup(a);
    int c = open("gone.txt", O_RDONLY);
    lseek(a, 2, SEEK_SET);
    lseek(c, 3, SEEK_SET);
    unlink("gone.txt");
    int mf = open("map.bin", O_RDWR | O_CREAT, 0600);
    char page[4096];
    for (int p = 0; p < 8; p++) { memset(page, 'a' + p, sizeof page); write(mf, page, sizeof page); }
    char *s = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mf, 0);
    char *pv = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, mf, 0);
    close(mf);
    unlink("map.bin");
    s[2 * 4096] = 'M';
    pv[5 * 4096] = 'P';
    ready();
    wait_go();
    struct stat st;
    CHECK(fstat(a, &st) == 0 && st.st_nlink == 0 && st.st_size == TAIL_AT + 4 && (st.st_mode & 07777) == 0640,
          "stat: nlink %ld size %ld mode %o", (long)st.st_nlink, (long)st.st_size, st.st_mode & 07777);
    CHECK(st.st_blocks * 512 < 256 * 1024, "the hole was filled: %ld blocks", (long)st.st_blocks);
    char link[512], path[64], cwd[400];
    snprintf(path, sizeof path, "/proc/self/fd/%d", a);
    ssize_t n = readlink(path, link, sizeof link - 1);
    link[n > 0 ? n : 0] = 0;
    getcwd(cwd, sizeof cwd);
    strcat(cwd, "/gone.txt (deleted)");
    CHECK(strcmp(link, cwd) == 0, "fd link %s", link);
    CHECK(access("gone.txt", F_OK) == -1 && access("map.bin", F_OK) == -1, "a deleted file came back");
    CHECK(lseek(a, 0, SEEK_CUR) == 2 && lseek(b, 0, SEEK_CUR) == 2 && lseek(c, 0, SEEK_CUR) == 3, "offsets");
    char buf[8] = {0};
    CHECK(read(a, buf, 2) == 2 && memcmp(buf, "ta", 2) == 0 && lseek(b, 0, SEEK_CUR) == 4, "shared offset");
    CHECK(pread(c, buf, 4, TAIL_AT) == 4 && memcmp(buf, "tail", 4) == 0, "tail");
    CHECK(lseek(c, 4096, SEEK_DATA) >= TAIL_AT - 4096, "hole: data at %ld", (long)lseek(c, 4096, SEEK_DATA));
    pwrite(a, "X", 1, 0);
    CHECK(pread(c, buf, 1, 0) == 1 && buf[0] == 'X', "the descriptions are not of one file");
    CHECK((fcntl(c, F_GETFL) & O_ACCMODE) == O_RDONLY, "read-only description");
    for (int p = 0; p < 8; p++) {
        CHECK(s[p * 4096] == (p == 2 ? 'M' : 'a' + p), "shared page %d: %c", p, s[p * 4096]);
        char want = p == 5 ? 'P' : p == 2 ? 'M' : 'a' + p; /* private: untouched pages follow the file */
        CHECK(pv[p * 4096] == want, "private page %d: %c", p, pv[p * 4096]);
    }
    s[7 * 4096] = 'W';
    CHECK(pv[7 * 4096] == 'W', "the private mapping does not see the file");
    return finish();
}
