/* Build and thread facts, and the multi-threaded copy (see runtime.h). */
#include "runtime.h"

#include <string.h>

#include "fn_activation.h"
#include "fn_platform.h"
#include "fn_pool.h"

/* Bytes per parallel task of fn_parallel_copy. */
#define FN_COPY_PIECE ((size_t)1 << 20)

int fn_openmp_enabled(void) { return FN_OPENMP_ENABLED; }

const char *fn_vector_paths(void)
{
#if FN_VECTOR_DISPATCH
    return "x86-64-v4,x86-64-v3,baseline";
#elif defined(__AVX512F__)
    return "compile-time AVX-512";
#elif defined(__AVX2__)
    return "compile-time AVX2";
#else
    return "baseline";
#endif
}

const char *fn_vector_path(void)
{
#if FN_VECTOR_DISPATCH
    /* The choice the loader's dispatch makes: the highest level this CPU supports. */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
        return "x86-64-v4";
    if (__builtin_cpu_supports("x86-64-v3"))
        return "x86-64-v3";
    return "baseline";
#else
    return fn_vector_paths();
#endif
}

int fn_get_max_threads(void) { return fn_omp_get_max_threads(); }

void fn_set_max_threads(int n) { fn_omp_set_num_threads(n); }

typedef struct {
    char *dst;
    const char *src;
    size_t nbytes;
} fn_copy_job;

static void fn_copy_region(fn_worker *w, void *arg)
{
    const fn_copy_job *j = arg;
    const ptrdiff_t pieces = (ptrdiff_t)((j->nbytes + FN_COPY_PIECE - 1) / FN_COPY_PIECE);
    FN_FOR(w, p, pieces, (ptrdiff_t)(FN_COPY_PIECE / 4))
    {
        size_t start = (size_t)p * FN_COPY_PIECE;
        size_t len = j->nbytes - start < FN_COPY_PIECE ? j->nbytes - start : FN_COPY_PIECE;
        memcpy(j->dst + start, j->src + start, len);
    }
}

void fn_parallel_copy(void *dst, const void *src, size_t nbytes, int num_threads)
{
    fn_copy_job j = {(char *)dst, (const char *)src, nbytes};
    fn_team_run(num_threads, fn_copy_region, &j);
}

/* The activations' building blocks on their own, piece by piece through an L1 buffer as the kernels run them
 * (which also lets y or g be x). */
#define FN_ACTIVATION_PIECE 1024

FN_VECTOR_KERNEL void fn_exp_values_f32(const float *x, float *y, ptrdiff_t n)
{
    float piece[FN_ACTIVATION_PIECE];
    for (ptrdiff_t i = 0; i < n; i += FN_ACTIVATION_PIECE) {
        const ptrdiff_t len = fn_min(n - i, FN_ACTIVATION_PIECE);
        fn_exp_run_f32(x + i, piece, len);
        memcpy(y + i, piece, (size_t)len * sizeof *y);
    }
}

FN_VECTOR_KERNEL void fn_exp_values_f64(const double *x, double *y, ptrdiff_t n)
{
    double piece[FN_ACTIVATION_PIECE];
    for (ptrdiff_t i = 0; i < n; i += FN_ACTIVATION_PIECE) {
        const ptrdiff_t len = fn_min(n - i, FN_ACTIVATION_PIECE);
        fn_exp_run_f64(x + i, piece, len);
        memcpy(y + i, piece, (size_t)len * sizeof *y);
    }
}

FN_VECTOR_KERNEL void fn_activate_values_f32(const float *x, float *y, ptrdiff_t n, fn_activation act)
{
    float piece[FN_ACTIVATION_PIECE];
    for (ptrdiff_t i = 0; i < n; i += FN_ACTIVATION_PIECE) {
        const ptrdiff_t len = fn_min(n - i, FN_ACTIVATION_PIECE);
        memcpy(piece, x + i, (size_t)len * sizeof *x);
        fn_activate_run_f32(piece, len, act);
        memcpy(y + i, piece, (size_t)len * sizeof *y);
    }
}

FN_VECTOR_KERNEL void fn_activate_values_f64(const double *x, double *y, ptrdiff_t n, fn_activation act)
{
    double piece[FN_ACTIVATION_PIECE];
    for (ptrdiff_t i = 0; i < n; i += FN_ACTIVATION_PIECE) {
        const ptrdiff_t len = fn_min(n - i, FN_ACTIVATION_PIECE);
        memcpy(piece, x + i, (size_t)len * sizeof *x);
        fn_activate_run_f64(piece, len, act);
        memcpy(y + i, piece, (size_t)len * sizeof *y);
    }
}

FN_VECTOR_KERNEL void fn_activation_grad_values_f32(const float *dy, const float *x, float *g, ptrdiff_t n,
                                                    fn_activation act)
{
    float piece[FN_ACTIVATION_PIECE];
    for (ptrdiff_t i = 0; i < n; i += FN_ACTIVATION_PIECE) {
        const ptrdiff_t len = fn_min(n - i, FN_ACTIVATION_PIECE);
        memcpy(piece, x + i, (size_t)len * sizeof *x);
        fn_activation_grad_run_f32(dy + i, piece, len, act);
        memcpy(g + i, piece, (size_t)len * sizeof *g);
    }
}

FN_VECTOR_KERNEL void fn_activation_grad_values_f64(const double *dy, const double *x, double *g, ptrdiff_t n,
                                                    fn_activation act)
{
    double piece[FN_ACTIVATION_PIECE];
    for (ptrdiff_t i = 0; i < n; i += FN_ACTIVATION_PIECE) {
        const ptrdiff_t len = fn_min(n - i, FN_ACTIVATION_PIECE);
        memcpy(piece, x + i, (size_t)len * sizeof *x);
        fn_activation_grad_run_f64(dy + i, piece, len, act);
        memcpy(g + i, piece, (size_t)len * sizeof *g);
    }
}
