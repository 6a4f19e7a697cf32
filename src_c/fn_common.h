/* Shared pieces of foldnorm's kernels: the OpenMP shim and the numerically careful statistics.
 *
 * This is the only file that names OpenMP functions; kernels use `#pragma omp` (ignored by a compiler
 * without OpenMP) and the fn_omp_* wrappers below.
 *
 * Statistics are never computed as float32 E[x^2] - E[x]^2.  A run of values is cut into blocks of at
 * most FN_STATS_BLOCK elements that stay in L1 cache; each block gets an exact centered two-pass mean and
 * M2 = sum((x - mean)^2) in float64, and blocks are combined with Chan's pairwise update in a fixed order.
 * Callers that parallelize do so over fixed units (never "one chunk per thread"), so every result is
 * bit-identical for any thread count.
 */
#ifndef FOLDNORM_FN_COMMON_H
#define FOLDNORM_FN_COMMON_H

#include <stddef.h>

#ifdef _OPENMP
#include <omp.h>
static inline int fn_omp_get_max_threads(void) { return omp_get_max_threads(); }
static inline void fn_omp_set_num_threads(int n) { omp_set_num_threads(n); }
static inline int fn_omp_get_thread_num(void) { return omp_get_thread_num(); }
#define FN_OPENMP_ENABLED 1
#else
static inline int fn_omp_get_max_threads(void) { return 1; }
static inline void fn_omp_set_num_threads(int n) { (void)n; }
static inline int fn_omp_get_thread_num(void) { return 0; }
#define FN_OPENMP_ENABLED 0
#endif

/* Elements per statistics block: 2048 floats (8 KiB) or doubles (16 KiB) fit in any L1 cache. */
#define FN_STATS_BLOCK 2048

/* Count, mean and M2 (sum of squared deviations) of a run of values. */
typedef struct {
    double n;
    double mean;
    double m2;
} fn_stats;

static inline fn_stats fn_stats_empty(void)
{
    fn_stats s = {0.0, 0.0, 0.0};
    return s;
}

/* Chan et al.'s pairwise combination: a becomes the statistics of a followed by b. */
static inline void fn_stats_merge(fn_stats *a, fn_stats b)
{
    if (b.n == 0.0)
        return;
    if (a->n == 0.0) {
        *a = b;
        return;
    }
    double n = a->n + b.n;
    double delta = b.mean - a->mean;
    a->mean += delta * (b.n / n);
    a->m2 += b.m2 + delta * delta * (a->n * b.n / n);
    a->n = n;
}

/* Population variance (M2 / n); 0 for an empty run. */
static inline double fn_stats_var(fn_stats s)
{
    return s.n > 0.0 ? s.m2 / s.n : 0.0;
}

/* Eight independent accumulators let the compiler vectorize a reduction without -ffast-math, and fix the
 * order of additions at compile time. */
#define FN_DEFINE_STATS(T, SUFFIX)                                                                     \
    /* Exact two-pass statistics of n <= FN_STATS_BLOCK values; the second pass also sums the residual   \
     * deviations, which corrects the mean for the rounding of the first pass. */                       \
    static inline fn_stats fn_block_stats_##SUFFIX(const T *x, ptrdiff_t n)                              \
    {                                                                                                    \
        double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};                                        \
        ptrdiff_t i = 0;                                                                                 \
        for (; i + 8 <= n; i += 8)                                                                       \
            for (int j = 0; j < 8; j++)                                                                  \
                acc[j] += (double)x[i + j];                                                              \
        double sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));  \
        for (; i < n; i++)                                                                               \
            sum += (double)x[i];                                                                         \
        double shift = sum / (double)n;                                                                  \
        double d1[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};                                         \
        double d2[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};                                         \
        for (i = 0; i + 8 <= n; i += 8)                                                                  \
            for (int j = 0; j < 8; j++) {                                                                \
                double d = (double)x[i + j] - shift;                                                     \
                d1[j] += d;                                                                              \
                d2[j] += d * d;                                                                          \
            }                                                                                            \
        double s1 = ((d1[0] + d1[1]) + (d1[2] + d1[3])) + ((d1[4] + d1[5]) + (d1[6] + d1[7]));           \
        double s2 = ((d2[0] + d2[1]) + (d2[2] + d2[3])) + ((d2[4] + d2[5]) + (d2[6] + d2[7]));           \
        for (; i < n; i++) {                                                                             \
            double d = (double)x[i] - shift;                                                             \
            s1 += d;                                                                                     \
            s2 += d * d;                                                                                 \
        }                                                                                                \
        fn_stats s;                                                                                      \
        s.n = (double)n;                                                                                 \
        s.mean = shift + s1 / (double)n;                                                                 \
        s.m2 = s2 - s1 * (s1 / (double)n);                                                               \
        if (!(s.m2 > 0.0) && s.m2 == s.m2)                                                               \
            s.m2 = 0.0;                                                                                  \
        return s;                                                                                        \
    }                                                                                                    \
                                                                                                         \
    /* Statistics of any number of contiguous values, block by block in a fixed order. */               \
    static inline fn_stats fn_run_stats_##SUFFIX(const T *x, ptrdiff_t n)                                \
    {                                                                                                    \
        fn_stats s = fn_stats_empty();                                                                   \
        for (ptrdiff_t start = 0; start < n; start += FN_STATS_BLOCK) {                                  \
            ptrdiff_t len = n - start < FN_STATS_BLOCK ? n - start : FN_STATS_BLOCK;                     \
            fn_stats_merge(&s, fn_block_stats_##SUFFIX(x + start, len));                                 \
        }                                                                                                \
        return s;                                                                                        \
    }

FN_DEFINE_STATS(float, f32)
FN_DEFINE_STATS(double, f64)

#endif
