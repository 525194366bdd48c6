/* cwd, umask and rlimits. */
#include "fidelity.h"
#include <sys/resource.h>
#include <sys/stat.h>

int main(void) {
    fid_init();
    mkdir("sub", 0755);
    open_ctl();
    chdir("sub");
    umask(027);
    struct rlimit r = {200, 300};
    setrlimit(RLIMIT_NOFILE, &r);
    struct rlimit c = {12345, 54321};
    setrlimit(RLIMIT_CORE, &c);
    char before[4096];
    getcwd(before, sizeof before);
    ready();
    wait_go();
    char now[4096];
    CHECK(getcwd(now, sizeof now) && strcmp(now, before) == 0, "cwd %s vs %s", now, before);
    mode_t m = umask(0);
    CHECK(m == 027, "umask %o", m);
    getrlimit(RLIMIT_NOFILE, &r);
    CHECK(r.rlim_cur == 200 && r.rlim_max == 300, "nofile %lu %lu", r.rlim_cur, r.rlim_max);
    getrlimit(RLIMIT_CORE, &c);
    CHECK(c.rlim_cur == 12345 && c.rlim_max == 54321, "core");
    return finish();
}
