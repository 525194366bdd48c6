/* Dump with --leave-running: the original and the restored copy both run; each writes its own
 * result file res.<pid> (the copy cannot have the original's pid, which is still alive). */
#include "fidelity.h"

int main(void) {
    fid_init();
    int *counter = malloc(sizeof *counter);
    *counter = 1000;
    int pid0 = getpid();
    ready();
    while (!go_received()) { (*counter)++; (*counter)--; msleep(1); }
    char name[64];
    snprintf(name, sizeof name, "res.%d", getpid());
    FILE *f = fopen(name, "w");
    int ok = *counter == 1000;
    fprintf(f, "%s %s\n", ok ? "PASS" : "FAIL", getpid() == pid0 ? "original" : "copy");
    fclose(f);
    return ok ? 0 : 1;
}
