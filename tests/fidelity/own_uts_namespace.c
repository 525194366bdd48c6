/* A process in a namespace of its own (here UTS, with its own host name) would be restored
 * into the restorer's namespaces, its host name silently gone: the dump is refused naming the
 * namespace, and the process runs on as it was. */
#include "fidelity.h"
#include <sched.h>

int main(void) {
    fid_init();
    if (unshare(CLONE_NEWUTS) != 0) { printf("FAIL unshare: %s\n", strerror(errno)); return 2; }
    if (sethostname("dvk-moved", 9) != 0) { printf("FAIL sethostname: %s\n", strerror(errno)); return 2; }
    ready();
    wait_go();
    char name[64] = {0};
    gethostname(name, sizeof name - 1);
    CHECK(strcmp(name, "dvk-moved") == 0, "host name %s", name);
    return finish();
}
