/* Build and thread facts, the multi-threaded copy that benchmarks use as the bandwidth roof, and the
 * activations' building blocks on their own (for the tests). */
#ifndef FOLDNORM_RUNTIME_H
#define FOLDNORM_RUNTIME_H

#include <stddef.h>

#include "fn_api.h"

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

/* fn_activation.h's building blocks over a run, compiled for the vector targets the kernels are (one call
 * runs the version the kernels run on this CPU): y = exp(x); y = act(x); g = dy * act'(x).  y and g may
 * be x. */
void fn_exp_values_f32(const float *x, float *y, ptrdiff_t n);
void fn_exp_values_f64(const double *x, double *y, ptrdiff_t n);
void fn_activate_values_f32(const float *x, float *y, ptrdiff_t n, fn_activation act);
void fn_activate_values_f64(const double *x, double *y, ptrdiff_t n, fn_activation act);
void fn_activation_grad_values_f32(const float *dy, const float *x, float *g, ptrdiff_t n, fn_activation act);
void fn_activation_grad_values_f64(const double *dy, const double *x, double *g, ptrdiff_t n, fn_activation act);

#endif
