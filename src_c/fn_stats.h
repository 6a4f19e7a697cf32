/* The statistics of foldnorm's forward kernels: count, mean and M2 of runs of values, and sums of squares.
 *
 * Statistics are never computed as float32 E[x^2] - E[x]^2.  A run of values is cut into blocks of at most
 * FN_STATS_BLOCK elements that stay in L1 cache; each block gets its mean and M2 = sum((x - mean)^2) from
 * sums centred on a shift near its mean (in float32 lanes for float32 when the cancellation is provably
 * small, else an exact two-pass in float64), and blocks are combined with Chan's pairwise update in a fixed
 * order.  Callers that parallelize do so over fixed units (never "one chunk per thread"), so every result is
 * bit-identical for any thread count.
 *
 * Everything here is an FN_INLINE building block that a kernel compiles into its own FN_VECTOR_KERNEL
 * dispatch points.  The type-generic half is fn_stats_impl.h, instantiated at the end of this file.
 */
#ifndef FOLDNORM_FN_STATS_H
#define FOLDNORM_FN_STATS_H

#include <math.h>
#include <stddef.h>

#include "fn_platform.h"

/* Elements per statistics block: 2048 floats (8 KiB) or doubles (16 KiB) fit in any L1 cache.  Kernels
 * also use it as the size of the L1 buffer that a streamed output is computed into. */
#define FN_STATS_BLOCK 2048

/* Independent float64 accumulators of an exact sum: enough to hide the latency of the additions, and a
 * loop GCC vectorizes without -ffast-math (the fixed order of additions permitting it). */
#define FN_ACCUMULATORS 8

/* ---- Count, mean and M2 ---- */

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

/* The FN_ACCUMULATORS accumulators of an exact sum added in a fixed tree. */
FN_INLINE double fn_sum_accumulators(const double *a)
{
    _Static_assert(FN_ACCUMULATORS == 8, "the tree below adds eight accumulators");
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

/* ---- float32 lanes ----
 *
 * float32 statistics and reductions run in float32 lanes: FN_LANES independent float32 partial sums, each
 * of FN_LANE_DEPTH values per group, each group's lanes added into float64 lane accumulators, which are
 * summed in a fixed tree at the end of the run.  Twice the vector width of the float64 loops and no
 * conversions in the inner loop; the rounding error of a lane stays that of a sum of FN_LANE_DEPTH floats.
 * Every caller checks the result and falls back to the exact float64 code where the lanes would not do.
 *
 * Every float32 lane loop takes a run of n values the same way: groups of up to FN_LANE_GROUP values over
 * the first fn_lane_body(n) (a whole number of lanes), group i..i+len with len = fn_lane_group(body, i);
 * then the last n - fn_lane_body(n) < FN_LANES values one by one in float64. */
#define FN_LANES 16
#define FN_LANE_DEPTH 8
#define FN_LANE_GROUP (FN_LANE_DEPTH * FN_LANES)

/* Each group's float32 lanes are added into the float64 lane accumulators.  Kept a loop: GCC vectorizes the
 * widening conversion in a loop, but turns it into scalar conversions and shuffles once it has unrolled the
 * loop, which slows the statistics down (benchmarks/README.md has the figure). */
FN_INLINE void fn_lanes_add(double *restrict acc, const float *restrict lane)
{
#pragma GCC unroll 1
    for (int j = 0; j < FN_LANES; j++)
        acc[j] += (double)lane[j];
}

FN_INLINE double fn_lanes_total(const double *acc)
{
    _Static_assert(FN_LANES == 2 * FN_ACCUMULATORS, "the lanes are added as two trees of accumulators");
    return fn_sum_accumulators(acc) + fn_sum_accumulators(acc + FN_ACCUMULATORS);
}

FN_INLINE ptrdiff_t fn_lane_body(ptrdiff_t n) { return n - n % FN_LANES; }

FN_INLINE ptrdiff_t fn_lane_group(ptrdiff_t body, ptrdiff_t i)
{
    return body - i < FN_LANE_GROUP ? body - i : FN_LANE_GROUP;
}

/* A float32 sum of n squares (of values, or of deviations) is trusted when its mean square lies in
 * [FN_F32_SQUARES_MIN, FN_F32_SQUARES_MAX]: then no square overflowed float32 (whose largest value is
 * 3.4e38), and the small ones kept their digits (float32 loses precision below 1.2e-38). */
#define FN_F32_SQUARES_MIN 1e-30
#define FN_F32_SQUARES_MAX 1e30

FN_INLINE int fn_f32_squares_in_range(double sum, ptrdiff_t n)
{
    return sum >= FN_F32_SQUARES_MIN * (double)n && sum <= FN_F32_SQUARES_MAX * (double)n;
}

/* A float32 block's statistics from the lanes are accepted only when s2 <= FN_MAX_CANCELLATION * M2, which
 * bounds the cancellation in M2 = s2 - s1^2 / n: the roundings of x - shift, of each d*d and of each lane
 * sum then leave M2 within about 5e-6 relative of the exact value to first order at worst (benchmarks/README.md
 * has the errors measured). */
#define FN_MAX_CANCELLATION 4.0

/* The shift of a float32 block's first sweep is the mean of its first FN_SHIFT_HEAD values; a block whose
 * cancellation is too large is swept again around the mean that sweep found, up to FN_LANE_SWEEPS sweeps in
 * all, before the exact two-pass. */
#define FN_SHIFT_HEAD 8
#define FN_LANE_SWEEPS 2

/* sums[0] = sum(x - shift), sums[1] = sum((x - shift)^2) in float32 lanes: one sweep over memory, each group
 * read twice from L1, once per sum. */
FN_INLINE void fn_lane_centred_sums(const float *restrict x, ptrdiff_t n, float shift, double sums[2])
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

/* sum(x^2) in float32 lanes.  The terms are positive, so each lane is within FN_LANE_DEPTH float32 roundings
 * of its exact sum. */
FN_INLINE double fn_lane_sum_squares(const float *restrict x, ptrdiff_t n)
{
    double acc[FN_LANES] = {0};
    const ptrdiff_t body = fn_lane_body(n);
    for (ptrdiff_t i = 0; i < body; i += FN_LANE_GROUP) {
        const ptrdiff_t len = fn_lane_group(body, i);
        float lane[FN_LANES] = {0};
        for (ptrdiff_t k = 0; k < len; k += FN_LANES)
            for (int j = 0; j < FN_LANES; j++)
                lane[j] += x[i + k + j] * x[i + k + j];
        fn_lanes_add(acc, lane);
    }
    double total = fn_lanes_total(acc);
    for (ptrdiff_t i = body; i < n; i++)
        total += (double)x[i] * (double)x[i];
    return total;
}

/* A power of two near `scale`, within 2^-limit .. 2^limit (1 unless scale is a positive finite number), as a
 * float. */
FN_INLINE float fn_pow2_within(double scale, int limit)
{
    if (!(scale > 0.0 && scale < HUGE_VAL))
        return 1.0f;
    int e;
    (void)frexp(scale, &e);
    e = e > limit ? limit : e < -limit ? -limit : e;
    return ldexpf(1.0f, e);
}

/* fn_pow2_near keeps its power of two within 2^-FN_POW2_LIMIT .. 2^FN_POW2_LIMIT: far inside float32's
 * range, and enough to bring any float32 deviation to unit size. */
#define FN_POW2_LIMIT 100

/* A power of two near `scale`, as a float.  Multiplying a float32 deviation x - centre by it is exact and
 * brings it near unit size when scale is the inverse standard deviation, so that its product with a
 * gradient neither underflows (values near 1e-22) nor overflows (values near 1e20) in float32. */
FN_INLINE float fn_pow2_near(double scale) { return fn_pow2_within(scale, FN_POW2_LIMIT); }

/* ---- float32 range ----
 *
 * A float32 row, group or channel is normalized as (x * s - centre * s) * (invstd / s), s a power of two near
 * invstd, where the plain (x - centre) * invstd would leave float32's range: an invstd above
 * FN_F32_INVSTD_MAX (tiny values with eps = 0: the backward passes' coefficients scale as invstd^2 and
 * would overflow, and a denormal row's invstd overflows float32 itself), below FN_F32_INVSTD_MIN
 * (the same coefficients would underflow), or a mean beyond
 * FN_F32_MEAN_MAX (mixed signs near float32's maximum, whose differences overflow).  Multiplying by s is
 * exact, so x * s - centre * s is the difference the plain loop computes, brought near unit size.
 * Everywhere else the plain loops run, unchanged: there invstd >= 2^-50 keeps every value within
 * sqrt(n) / invstd < 2^77 of a mean below 2^120, so that no difference overflows. */
#define FN_F32_INVSTD_MAX 0x1p50
#define FN_F32_INVSTD_MIN 0x1p-50
#define FN_F32_MEAN_MAX 0x1p120
/* The scale stays a normal float32: within 2^-126 .. 2^126, which brings any float32 row near unit size. */
#define FN_F32_SCALE_LIMIT 126

/* The power of two to scale a float32 run by (see above), or 1 where the plain loops keep their accuracy.
 * Non-finite statistics keep the plain loops, which propagate them. */
static inline double fn_f32_range_scale(double mean, double invstd)
{
    if (!(isfinite(mean) && invstd > 0.0 && invstd < HUGE_VAL))
        return 1.0;
    if (invstd <= FN_F32_INVSTD_MAX && invstd >= FN_F32_INVSTD_MIN && fabs(mean) <= FN_F32_MEAN_MAX)
        return 1.0;
    const double s = (double)fn_pow2_within(invstd, FN_F32_SCALE_LIMIT);
    /* A run whose values hardly differ near float32's maximum (a constant run: invstd = 1 / sqrt(eps)) must
     * not be scaled up: x * s and x * s - mean * s stay within float32's range when |mean| * s is at most
     * half of FN_F32_MEAN_MAX (fn_pow2_within(v) is at most 2 v). */
    if (fabs(mean) * s > 0.5 * FN_F32_MEAN_MAX)
        return (double)fn_pow2_within(0.25 * FN_F32_MEAN_MAX / fabs(mean), FN_F32_SCALE_LIMIT);
    return s;
}

/* ---- Per element type: fn_exact_sum, fn_block_stats, fn_run_stats, fn_sum_squares ---- */

#define FN_IMPL "fn_stats_impl.h"
#include "fn_instantiate.h"

#endif
