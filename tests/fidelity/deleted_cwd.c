/* A working directory removed while the process is in it, and another deleted directory held
 * open: the dump is refused naming both; the process runs on. */
#include "fidelity.h"
#include <sys/stat.h>

int main(void) {
    fid_init();
    open_ctl();
    mkdir("sub", 0700);
    mkdir("held", 0700);
    int d = open("held", O_RDONLY | O_DIRECTORY);
    rmdir("held");
    chdir("sub");
    rmdir("../sub");
    ready();
    wait_go();
    char buf[256];
    CHECK(getcwd(buf, sizeof buf) == NULL && errno == ENOENT, "cwd not deleted any more");
    CHECK(fcntl(d, F_GETFD) != -1, "directory fd lost");
    return finish();
}
