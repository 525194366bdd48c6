/* Identity: a process running as nobody (uid/gid 65534, started so by the driver) comes back
 * as nobody, with its supplementary groups, still dumpable (ptrace-able by its owner), and not
 * able to regain root. */
#include "fidelity.h"
#include <grp.h>
#include <sys/prctl.h>

int main(void) {
    fid_init();
    uid_t r, e, s;
    gid_t gr, ge, gs;
    getresuid(&r, &e, &s);
    getresgid(&gr, &ge, &gs);
    gid_t g0[64];
    int n0 = getgroups(64, g0);
    ready();
    wait_go();
    uid_t r1, e1, s1;
    gid_t gr1, ge1, gs1;
    getresuid(&r1, &e1, &s1);
    getresgid(&gr1, &ge1, &gs1);
    CHECK(r == r1 && e == e1 && s == s1, "uids %u %u %u -> %u %u %u", r, e, s, r1, e1, s1);
    CHECK(gr == gr1 && ge == ge1 && gs == gs1, "gids");
    CHECK(r1 == 65534, "not nobody: %u", r1);
    gid_t g1[64];
    int n1 = getgroups(64, g1);
    CHECK(n0 == n1 && memcmp(g0, g1, n0 * sizeof(gid_t)) == 0, "groups %d -> %d", n0, n1);
    CHECK(prctl(PR_GET_DUMPABLE) == 1, "not dumpable");
    CHECK(setuid(0) == -1, "regained root");
    return finish();
}
