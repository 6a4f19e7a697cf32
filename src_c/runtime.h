/* Build and thread facts, and the multi-threaded copy that benchmarks use as the bandwidth roof. */
#ifndef FOLDNORM_RUNTIME_H
#define FOLDNORM_RUNTIME_H

#include <stddef.h>

/* 1 when the kernels were built with OpenMP, else 0 (they then run on one thread). */
int fn_openmp_enabled(void);

/* The vector versions of the compute-bound loops this build has ("x86-64-v4,x86-64-v3,baseline" with the
 * loader's dispatch, else the one the compiler's target gave), and the one that runs on this CPU. */
const char *fn_vector_paths(void);
const char *fn_vector_path(void);

/* The default thread count of a kernel call, and setting it: OpenMP's setting (its nthreads-var, which
 * OMP_NUM_THREADS and threadpoolctl also set), though the kernels run on foldnorm's own team (fn_pool.h);
 * 1, and nothing, without OpenMP. */
int fn_get_max_threads(void);
void fn_set_max_threads(int n);

/* dst[0..nbytes) = src[0..nbytes) with num_threads threads of the kernels' team, in fixed 1 MiB pieces. */
void fn_parallel_copy(void *dst, const void *src, size_t nbytes, int num_threads);

#endif
