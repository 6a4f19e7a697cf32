/* Shared pieces of foldnorm's kernels: the OpenMP shim and the numerically careful statistics.
 *
 * This is the only file that names OpenMP functions; kernels use `#pragma omp` (ignored by a compiler
 * without OpenMP) and the fn_omp_* wrappers below.
 *
 * Statistics are never computed as float32 E[x^2] - E[x]^2.  A run of values is cut into blocks of at
 * most FN_STATS_BLOCK elements that stay in L1 cache; each block gets its mean and M2 = sum((x - mean)^2)
 * from sums centred on a shift near its mean (in float32 lanes for float32 when the cancellation is
 * provably small, else an exact two-pass in float64), and blocks are combined with Chan's pairwise update
 * in a fixed order.  Callers that parallelize do so over fixed units (never "one chunk per thread"), so
 * every result is bit-identical for any thread count.  batch_norm.c, layer_norm.c and group_norm.c all
 * take their statistics from here.
 */
#ifndef FOLDNORM_FN_COMMON_H
#define FOLDNORM_FN_COMMON_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

/* Outputs at least this large are written with non-temporal stores (see fn_stream_store_f32): beyond
 * the last-level cache of most machines (32 MiB on the development machine).  Measured there, streaming
 * pays off beyond it (batch_norm_train 1.24x instead of 1.42x the copy time on 205 MB, rms_norm 0.7x
 * instead of 0.88x on 268 MB) and is no better, sometimes worse, for 16-32 MiB outputs. */
#ifndef FN_STREAM_BYTES
#define FN_STREAM_BYTES ((ptrdiff_t)32 << 20)
#endif

/* dst[0..n) = src[0..n) with non-temporal stores, which write an output far larger than the caches
 * straight to memory: no read of every destination line into the cache first, and no eviction of input
 * that is about to be read again (batch_norm_train's second pass over x).  Only this copy
 * names SSE2, which every x86-64 has; the arithmetic stays in plain loops that write an L1-resident piece.
 * Elsewhere the output is written with ordinary stores. */
#if defined(__SSE2__)
#define FN_STREAMING 1
/* Scalar stores up to the first 16-byte boundary (all of them if dst is not even aligned to its type),
 * 16-byte non-temporal stores, scalar stores for the tail. */
#define FN_DEFINE_STREAM_STORE(T, SUFFIX, WIDTH, STREAM, LOAD)                                         \
    static inline void fn_stream_store_##SUFFIX(T *restrict dst, const T *restrict src, ptrdiff_t n) \
    {                                                                                                  \
        ptrdiff_t i = 0;                                                                               \
        for (; i < n && ((uintptr_t)(dst + i) & 15) != 0; i++)                                         \
            dst[i] = src[i];                                                                           \
        for (; i + (WIDTH) <= n; i += (WIDTH))                                                         \
            STREAM(dst + i, LOAD(src + i));                                                            \
        for (; i < n; i++)                                                                             \
            dst[i] = src[i];                                                                           \
    }
FN_DEFINE_STREAM_STORE(float, f32, 4, _mm_stream_ps, _mm_loadu_ps)
FN_DEFINE_STREAM_STORE(double, f64, 2, _mm_stream_pd, _mm_loadu_pd)

/* Non-temporal stores are weakly ordered: each thread fences its own before the region ends. */
static inline void fn_stream_fence(void) { _mm_sfence(); }
#else
#define FN_STREAMING 0
static inline void fn_stream_store_f32(float *restrict dst, const float *restrict src, ptrdiff_t n)
{
    memcpy(dst, src, (size_t)n * sizeof *dst);
}

static inline void fn_stream_store_f64(double *restrict dst, const double *restrict src, ptrdiff_t n)
{
    memcpy(dst, src, (size_t)n * sizeof *dst);
}

static inline void fn_stream_fence(void) {}
#endif

/* Whether an output of `count` elements of `size` bytes each is streamed to memory. */
static inline int fn_streams(ptrdiff_t count, size_t size)
{
    return FN_STREAMING && count * (ptrdiff_t)size >= FN_STREAM_BYTES;
}

/* For the building blocks that must be compiled into their caller's vector target. */
#if defined(__GNUC__)
#define FN_INLINE static inline __attribute__((always_inline))
#else
#define FN_INLINE static inline
#endif

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

/* The compute-bound loops are compiled twice, for baseline x86-64 and for x86-64-v3 (AVX2 and FMA), and
 * the loader picks one by the CPU it runs on (GNU ifunc), so a built package still runs on any x86-64.
 * Which version runs depends on the CPU alone, never on the thread count, so results stay bit-identical
 * for any number of threads; the build contracts a * b + c into FMA where the target has it. */
/* GCC 12 is the first to dispatch on arch=x86-64-v3; the dispatch needs glibc's ifunc (musl has none). */
#if defined(__x86_64__) && defined(__ELF__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) \
    && __GNUC__ >= 12 && !defined(__AVX2__)
#define FN_VECTOR_KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#ifndef FN_VECTOR_KERNEL
#define FN_VECTOR_KERNEL
#endif

/* The statistics and reductions below are inline building blocks: each kernel file compiles them into
 * its own FN_VECTOR_KERNEL functions (one dispatch per row, block or unit, not per call of a loop). */

/* Sum of eight accumulators in a fixed tree. */
FN_INLINE double fn_sum8(const double *a)
{
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* Statistics from centred sums s1 = sum(x - shift) and s2 = sum((x - shift)^2) of n values. */
FN_INLINE fn_stats fn_stats_from_centred(double n, double shift, double s1, double s2)
{
    fn_stats s;
    s.n = n;
    s.mean = shift + s1 / n;
    s.m2 = s2 - s1 * (s1 / n);
    if (!(s.m2 > 0.0) && s.m2 == s.m2)
        s.m2 = 0.0;
    return s;
}

/* The sum of a run of values in float64: eight independent accumulators, the order of additions fixed. */
#define FN_DEFINE_EXACT_SUM(T, SUFFIX)                                                                 \
    FN_INLINE double fn_exact_sum_##SUFFIX(const T *restrict x, ptrdiff_t n)                           \
    {                                                                                                  \
        const ptrdiff_t body = n - n % 8;                                                              \
        double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};                                      \
        for (ptrdiff_t i = 0; i < body; i += 8)                                                        \
            for (int j = 0; j < 8; j++)                                                                \
                acc[j] += (double)x[i + j];                                                            \
        double sum = fn_sum8(acc);                                                                     \
        for (ptrdiff_t i = body; i < n; i++)                                                           \
            sum += (double)x[i];                                                                       \
        return sum;                                                                                    \
    }

FN_DEFINE_EXACT_SUM(float, f32)
FN_DEFINE_EXACT_SUM(double, f64)

/* Exact two-pass statistics of n <= FN_STATS_BLOCK values in float64: the mean, then the sums of the
 * deviations (which correct the mean for the rounding of the first pass) and of their squares.  Each
 * sum is a loop of its own over eight independent accumulators: GCC vectorizes a loop with one
 * reduction (without -ffast-math, the fixed order of additions permitting it) but leaves one that
 * updates two arrays scalar. */
#define FN_DEFINE_EXACT_STATS(T, SUFFIX)                                                               \
    FN_INLINE fn_stats fn_exact_block_stats_##SUFFIX(const T *restrict x, ptrdiff_t n)               \
    {                                                                                                  \
        const ptrdiff_t body = n - n % 8;                                                              \
        const double shift = fn_exact_sum_##SUFFIX(x, n) / (double)n;                                  \
        double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};                                      \
        for (ptrdiff_t i = 0; i < body; i += 8)                                                        \
            for (int j = 0; j < 8; j++)                                                                \
                acc[j] += (double)x[i + j] - shift;                                                    \
        double s1 = fn_sum8(acc);                                                                      \
        for (int j = 0; j < 8; j++)                                                                    \
            acc[j] = 0.0;                                                                              \
        for (ptrdiff_t i = 0; i < body; i += 8)                                                        \
            for (int j = 0; j < 8; j++) {                                                              \
                double d = (double)x[i + j] - shift;                                                   \
                acc[j] += d * d;                                                                       \
            }                                                                                          \
        double s2 = fn_sum8(acc);                                                                      \
        for (ptrdiff_t i = body; i < n; i++) {                                                         \
            double d = (double)x[i] - shift;                                                           \
            s1 += d;                                                                                   \
            s2 += d * d;                                                                               \
        }                                                                                              \
        return fn_stats_from_centred((double)n, shift, s1, s2);                                        \
    }

FN_DEFINE_EXACT_STATS(float, f32)
FN_DEFINE_EXACT_STATS(double, f64)

/* float32 statistics in float32 lanes.  The same centred sums as the exact two-pass, but in one sweep
 * over memory (each group of FN_LANE_GROUP values is read twice from L1, once per sum) and in float32
 * arithmetic, each lane's partial sum of 8 values added into float64: twice the vector width of the
 * float64 loops and no conversions in the inner loop.
 *
 * The shift is the mean of the block's first 8 values, usually within a few standard deviations of the
 * block's mean; then x - shift is exact for values within a factor of 2 of it and s1^2 / n is a small part
 * of s2.  The result is accepted only when s2 <= FN_MAX_CANCELLATION * M2, which bounds the cancellation:
 * the roundings of x - shift, of each d*d and of each lane sum of 8 then leave M2 within about 5e-6
 * relative of the exact value to first order at worst (at most 4e-7 measured over 200,000 random
 * blocks, about 1e-7 typically).  Otherwise the sweep is repeated with the mean it found
 * as the shift.  Blocks whose squares could overflow or underflow float32 (|x - mean| beyond ~1e19 or
 * below ~1e-15, constant blocks, NaN, inf) get the exact float64 two-pass. */
#define FN_LANES 16
#define FN_LANE_GROUP (8 * FN_LANES)
#define FN_MAX_CANCELLATION 4.0

/* Each group's float32 lanes are added into float64 lane accumulators, which are summed in a fixed
 * tree at the end of the run.  Kept a loop: GCC vectorizes the widening conversion in a loop, but turns
 * it into scalar conversions and shuffles once it has unrolled the loop, which halves the speed of the
 * statistics. */
FN_INLINE void fn_lanes_add(double *restrict acc, const float *restrict lane)
{
#pragma GCC unroll 1
    for (int j = 0; j < FN_LANES; j++)
        acc[j] += (double)lane[j];
}

FN_INLINE double fn_lanes_total(const double *acc) { return fn_sum8(acc) + fn_sum8(acc + 8); }

/* Every float32 lane loop takes a run of n values the same way: groups of up to FN_LANE_GROUP values over
 * the first fn_lane_body(n) (a whole number of lanes), group i..i+len with len = fn_lane_group(body, i);
 * then the last n - fn_lane_body(n) < FN_LANES values one by one in float64. */
FN_INLINE ptrdiff_t fn_lane_body(ptrdiff_t n) { return n - n % FN_LANES; }

FN_INLINE ptrdiff_t fn_lane_group(ptrdiff_t body, ptrdiff_t i)
{
    return body - i < FN_LANE_GROUP ? body - i : FN_LANE_GROUP;
}

/* Whether a float32 sum of n squares (of values or of deviations) lies safely inside float32's range:
 * no square overflowed, and the small ones kept their digits. */
FN_INLINE int fn_f32_squares_in_range(double sum, ptrdiff_t n)
{
    return sum >= 1e-30 * (double)n && sum <= 1e30 * (double)n;
}

/* sums[0] = sum(x - shift), sums[1] = sum((x - shift)^2). */
FN_INLINE void fn_centred_sums_f32(const float *restrict x, ptrdiff_t n, float shift, double sums[2])
{
    double acc1[FN_LANES] = {0}, acc2[FN_LANES] = {0};
    const ptrdiff_t body = fn_lane_body(n);
    for (ptrdiff_t i = 0; i < body; i += FN_LANE_GROUP) {
        const ptrdiff_t len = fn_lane_group(body, i);
        float lane1[FN_LANES] = {0}, lane2[FN_LANES] = {0};
        for (ptrdiff_t k = 0; k < len; k += FN_LANES)
            for (int j = 0; j < FN_LANES; j++)
                lane1[j] += x[i + k + j] - shift;
        for (ptrdiff_t k = 0; k < len; k += FN_LANES)
            for (int j = 0; j < FN_LANES; j++) {
                float d = x[i + k + j] - shift;
                lane2[j] += d * d;
            }
        fn_lanes_add(acc1, lane1);
        fn_lanes_add(acc2, lane2);
    }
    double s1 = fn_lanes_total(acc1), s2 = fn_lanes_total(acc2);
    for (ptrdiff_t i = body; i < n; i++) {
        double d = (double)(x[i] - shift);
        s1 += d;
        s2 += d * d;
    }
    sums[0] = s1;
    sums[1] = s2;
}

/* Statistics of n <= FN_STATS_BLOCK values: float32 lanes when they are accurate, else exact. */
FN_INLINE fn_stats fn_block_stats_f32(const float *x, ptrdiff_t n)
{
    const ptrdiff_t head = n < 8 ? n : 8;
    double head_sum = 0.0;
    for (ptrdiff_t j = 0; j < head; j++)
        head_sum += (double)x[j];
    float shift = (float)(head_sum / (double)head);
    for (int attempt = 0; attempt < 2; attempt++) {
        double sums[2];
        fn_centred_sums_f32(x, n, shift, sums);
        double m2 = sums[1] - sums[0] * (sums[0] / (double)n);
        if (!(fn_f32_squares_in_range(m2, n) && fn_f32_squares_in_range(sums[1], n)))
            break;
        if (sums[1] <= FN_MAX_CANCELLATION * m2) {
            fn_stats s = {(double)n, (double)shift + sums[0] / (double)n, m2};
            return s;
        }
        shift = (float)((double)shift + sums[0] / (double)n);
    }
    return fn_exact_block_stats_f32(x, n);
}

FN_INLINE fn_stats fn_block_stats_f64(const double *x, ptrdiff_t n)
{
    return fn_exact_block_stats_f64(x, n);
}

/* A power of two near `scale` (1 unless it is a positive finite number), as a float.  Multiplying a
 * float32 deviation x - centre by it is exact and brings it near unit size when scale is the inverse
 * standard deviation, so that its product with a gradient neither underflows (values near 1e-22) nor
 * overflows (values near 1e20) in float32. */
FN_INLINE float fn_pow2_near(double scale)
{
    if (!(scale > 0.0 && scale < HUGE_VAL))
        return 1.0f;
    int e;
    (void)frexp(scale, &e);
    e = e > 100 ? 100 : e < -100 ? -100 : e;
    return ldexpf(1.0f, e);
}

/* The reduction of the batch and group norm backward passes: sums[0] = sum(dy), sums[1] = sum(dy * (x -
 * centre)) over n contiguous values, given invstd, the inverse standard deviation of x.
 * fn_exact_grad_sums: eight float64 accumulators per sum, one loop each (float64 input, and float32 input
 * whose lanes would not do).  float32: float32 lanes of 8 values summed in float64, around the float32
 * rounding c of the centre (x - c is exact for x near the centre) and with x - c scaled by
 * fn_pow2_near(invstd), with sum(dy) * (c - centre) added back; a run whose sums still come out infinite
 * or NaN is summed again exactly. */
#define FN_DEFINE_EXACT_GRAD_SUMS(T, SUFFIX)                                                           \
    FN_INLINE void fn_exact_grad_sums_##SUFFIX(const T *restrict dy, const T *restrict x, ptrdiff_t n, \
                                               double centre, double sums[2])                          \
    {                                                                                                  \
        const ptrdiff_t body = n - n % 8;                                                              \
        double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};                                      \
        for (ptrdiff_t i = 0; i < body; i += 8)                                                        \
            for (int j = 0; j < 8; j++)                                                                \
                acc[j] += (double)dy[i + j] * ((double)x[i + j] - centre);                             \
        double sum_dy_xc = fn_sum8(acc);                                                               \
        for (ptrdiff_t i = body; i < n; i++)                                                           \
            sum_dy_xc += (double)dy[i] * ((double)x[i] - centre);                                      \
        sums[0] = fn_exact_sum_##SUFFIX(dy, n);                                                        \
        sums[1] = sum_dy_xc;                                                                           \
    }

FN_DEFINE_EXACT_GRAD_SUMS(float, f32)
FN_DEFINE_EXACT_GRAD_SUMS(double, f64)

FN_INLINE void fn_grad_sums_f64(const double *dy, const double *x, ptrdiff_t n, double centre, double invstd,
                                double sums[2])
{
    (void)invstd;
    fn_exact_grad_sums_f64(dy, x, n, centre, sums);
}

FN_INLINE void fn_lane_grad_sums_f32(const float *restrict dy, const float *restrict x, ptrdiff_t n, float c,
                                     float s, double sums[2])
{
    double acc1[FN_LANES] = {0}, acc2[FN_LANES] = {0};
    const ptrdiff_t body = fn_lane_body(n);
    for (ptrdiff_t i = 0; i < body; i += FN_LANE_GROUP) {
        const ptrdiff_t len = fn_lane_group(body, i);
        float lane1[FN_LANES] = {0}, lane2[FN_LANES] = {0};
        for (ptrdiff_t k = 0; k < len; k += FN_LANES)
            for (int j = 0; j < FN_LANES; j++)
                lane1[j] += dy[i + k + j];
        for (ptrdiff_t k = 0; k < len; k += FN_LANES)
            for (int j = 0; j < FN_LANES; j++)
                lane2[j] += dy[i + k + j] * ((x[i + k + j] - c) * s);
        fn_lanes_add(acc1, lane1);
        fn_lanes_add(acc2, lane2);
    }
    double sum_dy = fn_lanes_total(acc1), sum_dy_xc = fn_lanes_total(acc2) / s;
    for (ptrdiff_t i = body; i < n; i++) {
        sum_dy += (double)dy[i];
        sum_dy_xc += (double)dy[i] * ((double)x[i] - (double)c);
    }
    sums[0] = sum_dy;
    sums[1] = sum_dy_xc;
}

FN_INLINE void fn_grad_sums_f32(const float *dy, const float *x, ptrdiff_t n, double centre, double invstd,
                                double sums[2])
{
    const float c = (float)centre;
    fn_lane_grad_sums_f32(dy, x, n, c, fn_pow2_near(invstd), sums);
    if (!(isfinite(sums[0]) && isfinite(sums[1])))
        fn_exact_grad_sums_f32(dy, x, n, centre, sums);
    else
        sums[1] += sums[0] * ((double)c - centre);
}

/* Statistics of any number of contiguous values, block by block in a fixed order. */
#define FN_DEFINE_RUN_STATS(T, SUFFIX)                                                                 \
    FN_INLINE fn_stats fn_run_stats_##SUFFIX(const T *x, ptrdiff_t n)                                \
    {                                                                                                  \
        fn_stats s = fn_stats_empty();                                                                 \
        for (ptrdiff_t start = 0; start < n; start += FN_STATS_BLOCK) {                                \
            ptrdiff_t len = n - start < FN_STATS_BLOCK ? n - start : FN_STATS_BLOCK;                   \
            fn_stats_merge(&s, fn_block_stats_##SUFFIX(x + start, len));                               \
        }                                                                                              \
        return s;                                                                                      \
    }

FN_DEFINE_RUN_STATS(float, f32)
FN_DEFINE_RUN_STATS(double, f64)

#endif
