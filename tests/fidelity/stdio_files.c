/* stdout and stderr redirected to files: output before and after the restore lands in order,
 * at the right offsets (the driver also reads the files). stdin is /dev/null. */
#include "fidelity.h"

int main(void) {
    fid_init();
    fprintf(stderr, "err-before\n");
    printf("out-before\n");
    ready();
    wait_go();
    fprintf(stderr, "err-after\n");
    char c;
    CHECK(read(0, &c, 1) == 0, "stdin is not at EOF (/dev/null)");
    printf("out-after\n");
    return finish();
}
