/* A stress test of foldnorm's thread pool (src_c/pool.c), built and run by test_pool_stress.py, also under
 * ThreadSanitizer: regions of several loops, each unit's result checked, run from several calling threads at
 * once with random team sizes, while a thread turns the workers' hold on and off.  Exits 0 when every result
 * was right. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "pool.h"

#define UNITS 2000
#define CALLERS 3
#define CALLS 300

typedef struct {
    long a[UNITS], b[UNITS], total[UNITS / 10];
    long seed;
} job;

/* Three dependent loops: the second reads the first's results, the third reduces the second's in a fixed
 * order per group of ten units. */
static void region(fn_worker *w, void *arg)
{
    job *j = arg;
    FN_FOR(w, u, UNITS, 500)
    j->a[u] = j->seed + u;
    FN_FOR(w, u, UNITS, 700)
    j->b[u] = 3 * j->a[UNITS - 1 - u];
    FN_FOR(w, g, UNITS / 10, 5000)
    {
        long s = 0;
        for (ptrdiff_t k = 0; k < 10; k++)
            s += j->b[10 * g + k];
        j->total[g] = s;
    }
}

static int check(const job *j)
{
    for (long g = 0; g < UNITS / 10; g++) {
        long s = 0;
        for (long k = 0; k < 10; k++)
            s += 3 * (j->seed + (UNITS - 1 - (10 * g + k)));
        if (j->total[g] != s)
            return 0;
    }
    return 1;
}

static volatile int failures;
static volatile int stop_toggling;

static void *caller(void *arg)
{
    unsigned seed = (unsigned)(size_t)arg;
    job *j = malloc(sizeof *j);
    for (int i = 0; i < CALLS; i++) {
        j->seed = (long)rand_r(&seed);
        fn_pool_run(1 + (int)(rand_r(&seed) % 5), region, j);
        if (!check(j))
            __atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);
    }
    free(j);
    return NULL;
}

static void *toggler(void *arg)
{
    (void)arg;
    unsigned seed = 7;
    while (!__atomic_load_n(&stop_toggling, __ATOMIC_RELAXED)) {
        fn_pool_hold_workers((int)(rand_r(&seed) % 4 == 0));
        fn_pool_set_spin(rand_r(&seed) % 2 ? 0 : 50000, rand_r(&seed) % 2 ? 0 : 20000000);
    }
    return NULL;
}

int main(void)
{
    fn_pool_attach(fn_pool_run);
    pthread_t callers[CALLERS], toggle;
    pthread_create(&toggle, NULL, toggler, NULL);
    for (size_t k = 0; k < CALLERS; k++)
        pthread_create(&callers[k], NULL, caller, (void *)(k + 1));
    for (size_t k = 0; k < CALLERS; k++)
        pthread_join(callers[k], NULL);
    __atomic_store_n(&stop_toggling, 1, __ATOMIC_RELAXED);
    pthread_join(toggle, NULL);
    long long stats[FN_POOL_STAT_COUNT];
    fn_pool_stats(stats);
    printf("failures %d team_regions %lld busy_regions %lld caller_units %lld worker_units %lld workers %lld\n",
           failures, stats[0], stats[1], stats[2], stats[3], stats[4]);
    return failures != 0;
}
