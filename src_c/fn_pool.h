/* foldnorm's thread team: how a kernel's parallel region shares its units of work.
 *
 * A kernel writes a parallel region as a function run by every thread of a team, the calling thread first:
 *
 *     static void region(fn_worker *w, void *arg) {
 *         FN_FOR(w, u, units, unit_elements) { ...unit u... }       one loop over units of work
 *         FN_FOR(w, r, rows, cols) { ...row r... }                  the next, once every unit of the first is done
 *     }
 *     fn_team_run(num_threads, region, &arg);
 *
 * Units are claimed in chunks from a shared counter, so a thread takes the next chunk as soon as it is free,
 * and the calling thread works too.  A worker that the operating system has not scheduled never holds a call
 * up: the caller takes every chunk that no worker has claimed, and waits only for the chunks that a running
 * worker claimed.  A loop ends when all its units are done, whichever threads did them, so a worker that
 * joins late just finds the earlier loops finished.  Every unit's result belongs to the unit, never to a
 * thread (partials are stored per unit and merged in a fixed order): results are bit-identical whatever the
 * thread count and whichever thread ran which chunk.
 *
 * Workers spin briefly after a call, so that back-to-back calls find them awake, then sleep; the caller
 * never waits for a sleeping worker to wake: it starts on the work at once.  The pool itself is pool.c,
 * linked into one extension module (foldnorm.kernels._runtime); the others reach it through
 * fn_pool_attach, and run their regions on the calling thread alone until they are attached.
 */
#ifndef FOLDNORM_FN_POOL_H
#define FOLDNORM_FN_POOL_H

#include <stdatomic.h>
#include <stddef.h>

#include "fn_platform.h"

/* Loops (FN_FOR) a region may run, one after the other. */
#define FN_TEAM_MAX_LOOPS 8
/* Elements of work a chunk holds at least (about ten microseconds of a memory-bound loop): a claim is an
 * atomic add on a cache line the threads share, which costs a few hundred nanoseconds between the cores of
 * a virtual machine (16 Ki-element chunks made 2-thread calls 5-20% slower than OpenMP's static split on
 * this project's VM), and a chunk is what the caller may have to wait for when a worker is preempted in it. */
#define FN_CHUNK_ELEMENTS 65536
/* Chunks per thread a loop is cut into at least, when its units allow: the load balances over them. */
#define FN_CHUNKS_PER_THREAD 8

/* Threads a team has at most: the caller and FN_TEAM_MAX_THREADS - 1 workers. */
#define FN_TEAM_MAX_THREADS 256

/* A loop's units are cut into one contiguous range per thread of the team, and each range hands out its
 * units in order from its own counter: a thread claims chunks from its own range first, so that each
 * thread streams through one contiguous part of the tensors (a unit-by-unit interleaving of two threads
 * made a 2-thread layer_norm_backward 20% slower than OpenMP's static halves), then from the other ranges
 * in turn, so that no unit waits for a thread that has not started. */
typedef struct {
    _Alignas(FN_CACHE_LINE) atomic_ptrdiff_t claimed; /* units of the range handed out (may overshoot) */
} fn_range_counter;

/* One loop's counters, each on its own cache line: the units claimed from each range; the units done, with
 * a flag set when they all are and the count of threads asleep until then. */
typedef struct {
    fn_range_counter ranges[FN_TEAM_MAX_THREADS];
    _Alignas(FN_CACHE_LINE) atomic_ptrdiff_t done;
    atomic_int finished;
    atomic_int sleepers;
} fn_loop_state;

typedef struct {
    fn_loop_state loops[FN_TEAM_MAX_LOOPS];
    int threads;                 /* the team's size: the caller and up to threads - 1 workers */
    atomic_ptrdiff_t worker_units; /* units done by workers in this call */
} fn_team;

/* What a thread running a region knows: its team (NULL: the region runs on this thread alone), how many of
 * the region's loops it has entered, the units it did, and its place in the team (the caller 0, workers
 * 1, 2, ... in the order they joined: the range of each loop it claims from first). */
typedef struct {
    fn_team *team;
    int loop;
    int is_caller;
    ptrdiff_t units;
    long long slept_ns; /* time this thread slept waiting for the other threads' chunks */
    int index;
} fn_worker;

typedef void (*fn_region)(fn_worker *w, void *arg);

/* Elements of work below which a step runs on the calling thread alone: a merge of partial results, say,
 * takes microseconds, and a team would only add a moment where the caller may wait for a worker. */
#define FN_TEAM_MIN_ELEMENTS ((ptrdiff_t)1 << 16)

/* num_threads for a step of `elements` elements of work: 1 below FN_TEAM_MIN_ELEMENTS. */
static inline int fn_team_size(ptrdiff_t elements, int num_threads)
{
    return elements < FN_TEAM_MIN_ELEMENTS ? 1 : num_threads;
}
typedef void (*fn_team_runner)(int num_threads, fn_region region, void *arg);

/* Runs region(w, arg) on a team of at most num_threads threads, the caller among them; returns when every
 * loop of the region is done. */
void fn_team_run(int num_threads, fn_region region, void *arg);

/* The pool this module's regions run on (pool.c's fn_pool_run); NULL keeps them on the calling thread. */
void fn_pool_attach(fn_team_runner runner);

/* ---- The loops of a region ---- */

typedef struct {
    fn_worker *w;
    fn_loop_state *state; /* NULL: serial */
    ptrdiff_t n, chunk, begin, end;
    ptrdiff_t pending; /* units this thread did and has not yet added to the loop's done count */
    int range, ranges_left; /* the range claimed from now, and the ranges not yet found exhausted */
} fn_for;

/* The cycle a waiting thread spends before it looks again (the pause instruction where there is one). */
static inline void fn_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* A thread that waits for the other threads' chunks of a loop spins this many times, then sleeps until the
 * thread that finishes the loop wakes it: a sleeping thread is the one the scheduler runs promptly when it is
 * woken, where one that yielded its core to another process may wait for that process's whole time slice. */
#define FN_WAIT_SPINS 512
long long fn_loop_sleep(fn_loop_state *s); /* returns the nanoseconds slept */
void fn_loop_wake(fn_loop_state *s);

static inline fn_for fn_for_begin(fn_worker *w, ptrdiff_t n, ptrdiff_t unit_elements)
{
    fn_for f;
    f.w = w;
    f.n = n;
    f.begin = f.end = 0;
    f.pending = 0;
    f.state = NULL;
    f.chunk = n;
    f.range = f.ranges_left = 0;
    if (w->team != NULL) {
        if (w->loop >= FN_TEAM_MAX_LOOPS) {
            /* Past the team's loops the caller runs the rest of the region alone. */
            f.n = w->is_caller ? n : 0;
        } else {
            f.state = &w->team->loops[w->loop];
            const ptrdiff_t per_unit = unit_elements > 0 ? unit_elements : 1;
            ptrdiff_t chunk = FN_CHUNK_ELEMENTS / per_unit;
            const ptrdiff_t balanced = n / ((ptrdiff_t)w->team->threads * FN_CHUNKS_PER_THREAD);
            chunk = chunk < balanced ? chunk : balanced;
            f.chunk = chunk > 1 ? chunk : 1;
            f.range = w->index % w->team->threads;
            f.ranges_left = w->team->threads;
        }
    }
    w->loop++;
    return f;
}

/* The next chunk [f->begin, f->end) of units for this thread: 1, or 0 once every unit of the loop is done.
 * A thread adds the units it did to the loop's done count once, when it finds no chunk left to claim (one
 * shared write per thread and loop, not one per chunk).  Streamed (non-temporal) stores are weakly ordered:
 * a thread fences its own before its units count as done, and before a loop it ran alone ends. */
static inline int fn_for_next(fn_for *f)
{
    fn_loop_state *s = f->state;
    const ptrdiff_t did = f->end - f->begin;
    if (s == NULL) {
        /* The whole range at once, on this thread. */
        if (did > 0 || f->n <= 0) {
            fn_stream_fence();
            return 0;
        }
        f->end = f->n;
        f->w->units += f->n;
        return 1;
    }
    f->w->units += did;
    f->pending += did;
    const ptrdiff_t threads = f->w->team->threads;
    for (; f->ranges_left > 0; f->ranges_left--, f->range = (f->range + 1) % (int)threads) {
        const ptrdiff_t lo = f->n * f->range / threads, hi = f->n * (f->range + 1) / threads;
        if (lo >= hi)
            continue;
        const ptrdiff_t b = lo + atomic_fetch_add_explicit(&s->ranges[f->range].claimed, f->chunk,
                                                           memory_order_relaxed);
        if (b < hi) {
            f->begin = b;
            f->end = b + f->chunk < hi ? b + f->chunk : hi;
            return 1;
        }
    }
    f->begin = f->end = 0;
    if (f->pending > 0) {
        fn_stream_fence();
        const ptrdiff_t pending = f->pending;
        f->pending = 0;
        if (atomic_fetch_add_explicit(&s->done, pending, memory_order_acq_rel) + pending == f->n) {
            /* The last units: the loop is done, and threads asleep waiting for it are woken. */
            atomic_store(&s->finished, 1);
            if (atomic_load(&s->sleepers) > 0)
                fn_loop_wake(s);
        }
    }
    /* The loop is done when every unit is: only chunks that another running thread claimed are waited for. */
    for (unsigned spins = 0; atomic_load_explicit(&s->done, memory_order_acquire) < f->n; spins++) {
        if (spins < FN_WAIT_SPINS) {
            fn_cpu_relax();
            continue;
        }
        f->w->slept_ns += fn_loop_sleep(s);
        break;
    }
    return 0;
}

/* for (ptrdiff_t i ...) over the units [0, n) of one loop of a region, unit_elements the elements a unit
 * touches (its size for the chunking: any value gives the same results). */
#define FN_FOR(w, i, n, unit_elements)                                                                   \
    for (fn_for fn_for_ = fn_for_begin((w), (n), (unit_elements)); fn_for_next(&fn_for_);)           \
        for (ptrdiff_t i = fn_for_.begin; i < fn_for_.end; i++)

#endif
