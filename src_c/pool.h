/* foldnorm's thread pool (see fn_pool.h): one per process, in foldnorm.kernels._runtime. */
#ifndef FOLDNORM_POOL_H
#define FOLDNORM_POOL_H

#include "fn_pool.h"

/* Runs a region on a team of the caller and up to num_threads - 1 of the pool's workers, starting workers
 * the first time they are needed.  A call made while the pool runs another caller's region (from another
 * thread), or from inside a region, runs on its calling thread alone. */
void fn_pool_run(int num_threads, fn_region region, void *arg);

/* Counters since the process started, for tests and benchmarks:
 * [0] regions run on a team, [1] regions run alone because the pool was busy, [2] units done by callers,
 * [3] units done by workers, [4] workers started, [5] regions run alone because a recent caller waited
 * for a preempted worker, [6] regions whose caller waited that long, [7] idle spins that a thread waiting
 * for a core (or the spinning worker's own preemption) ended early, [8] idle spins that ran to the longer
 * limit, the machine having a core for every runnable thread throughout. */
#define FN_POOL_STAT_COUNT 9
void fn_pool_stats(long long out[FN_POOL_STAT_COUNT]);

/* For tests: while held is nonzero no worker joins a region, as if the operating system never scheduled
 * one; the caller must then do all the work. */
void fn_pool_hold_workers(int held);

/* For benchmarks: how long idle workers spin before they sleep, at most ns (FN_POOL_SPIN_NS by default), or at
 * most idle_ns while the machine has a core for every runnable thread (FN_POOL_IDLE_SPIN_NS); 0 and 0 sleep
 * at once, as OpenMP's passive wait policy does. */
void fn_pool_set_spin(long long ns, long long idle_ns);

#endif
