/* The side of the thread team that every extension module links (see fn_pool.h): the pool it is attached
 * to, and running a region there or on the calling thread alone. */
#define _POSIX_C_SOURCE 200809L
#include "fn_pool.h"

#include <sched.h>

static fn_team_runner fn_attached_runner = NULL;

void fn_pool_attach(fn_team_runner runner) { fn_attached_runner = runner; }

void fn_wait_yield(void) { sched_yield(); }

void fn_team_run(int num_threads, fn_region region, void *arg)
{
    if (num_threads > 1 && fn_attached_runner != NULL) {
        fn_attached_runner(num_threads, region, arg);
        return;
    }
    fn_worker w = {NULL, 0, 1, 0};
    region(&w, arg);
}
