/* rseq: glibc 2.36 registered an rseq area at start-up; after restore it is registered again at
 * the same address (a second registration with the same arguments answers EBUSY) and the cpu
 * id it publishes is right, under preemption (sched_yield) and forced migration. */
#include "fidelity.h"
#include <sched.h>
#include <sys/rseq.h>

int main(void) {
    fid_init();
    if (__rseq_size == 0) { printf("(glibc did not register rseq)\n"); }
    struct rseq *rs = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
    ready();
    long iters = 0;
    while (!go_received()) { sched_getcpu(); sched_yield(); iters++; }
    if (__rseq_size) {
        long r = syscall(SYS_rseq, rs, __rseq_size < 32 ? 32 : __rseq_size, 0, RSEQ_SIG);
        CHECK(r == -1 && errno == EBUSY, "rseq re-register: %ld errno %d (want EBUSY: still registered)", r, errno);
        int ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        for (int i = 0; i < 200; i++) {
            cpu_set_t set; CPU_ZERO(&set); CPU_SET(i % ncpu, &set);
            sched_setaffinity(0, sizeof set, &set);
            sched_yield();
            unsigned cpu, node;
            syscall(SYS_getcpu, &cpu, &node, NULL);
            int g = sched_getcpu();
            CHECK((unsigned)g == cpu && rs->cpu_id == cpu, "cpu: rseq %u glibc %d syscall %u", rs->cpu_id, g, cpu);
            if (failures) break;
        }
    }
    return finish();
}
