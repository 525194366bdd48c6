/* A SIGTRAP handler survives the dump (whose int3 must not reset it) and runs after restore. */
#include "fidelity.h"
static volatile int got; static void h(int s){(void)s; got++;}
int main(void){ fid_init(); signal(SIGTRAP, h); ready(); wait_go(); struct sigaction q; sigaction(SIGTRAP, NULL, &q); CHECK(q.sa_handler == h, "SIGTRAP handler lost"); raise(SIGTRAP); CHECK(got==1, "not called"); return finish(); }
