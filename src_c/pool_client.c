/* The side of the thread team that every extension module links (see fn_pool.h): the pool it is attached
 * to, and running a region there or on the calling thread alone. */
#define _GNU_SOURCE
#include "fn_pool.h"

#include <sched.h>
#include <time.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

static fn_team_runner fn_attached_runner = NULL;

void fn_pool_attach(fn_team_runner runner) { fn_attached_runner = runner; }

/* Sleeps until the loop's finished flag is set: on Linux a futex on it, which fn_loop_wake wakes; elsewhere
 * by yielding the core between looks.  The sleeper count and the flag are sequentially consistent on both
 * sides: either the waiter sees the flag, or the thread that set it sees the sleeper and wakes it. */
long long fn_loop_sleep(fn_loop_state *s)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    atomic_fetch_add(&s->sleepers, 1);
    while (!atomic_load(&s->finished)) {
#if defined(__linux__)
        syscall(SYS_futex, (int *)&s->finished, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
#else
        sched_yield();
#endif
    }
    atomic_fetch_sub(&s->sleepers, 1);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
}

void fn_loop_wake(fn_loop_state *s)
{
#if defined(__linux__)
    syscall(SYS_futex, (int *)&s->finished, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)s;
#endif
}

void fn_team_run(int num_threads, fn_region region, void *arg)
{
    if (num_threads > 1 && fn_attached_runner != NULL) {
        fn_attached_runner(num_threads, region, arg);
        return;
    }
    fn_worker w = {NULL, 0, 1, 0, 0, 0};
    region(&w, arg);
}
