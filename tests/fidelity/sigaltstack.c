/* sigaltstack: the alternate stack is still configured and a SA_ONSTACK handler runs on it. */
#include "fidelity.h"

static char alt[65536];
static volatile int on_alt;
static void h(int s) { (void)s; char x; on_alt = (&x >= alt && &x < alt + sizeof alt); }

int main(void) {
    fid_init();
    stack_t ss = {.ss_sp = alt, .ss_size = sizeof alt, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    struct sigaction sa = {0};
    sa.sa_handler = h;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGUSR1, &sa, NULL);
    ready();
    wait_go();
    stack_t q;
    sigaltstack(NULL, &q);
    CHECK(q.ss_sp == alt && q.ss_size == sizeof alt && !(q.ss_flags & SS_DISABLE), "altstack %p %zu %d", q.ss_sp, q.ss_size, q.ss_flags);
    raise(SIGUSR1);
    CHECK(on_alt, "handler not on the alternate stack");
    return finish();
}
