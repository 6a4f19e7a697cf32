/* The type-generic statistics of fn_stats.h, instantiated once per element type (see fn_instantiate.h). */
#ifndef FN_T
#error "fn_stats_impl.h is instantiated by fn_stats.h"
#endif

/* The sum of a run of values in float64: FN_ACCUMULATORS independent accumulators, the order of additions
 * fixed. */
FN_INLINE double FN_NAME(fn_exact_sum)(const FN_T *restrict x, ptrdiff_t n)
{
    const ptrdiff_t body = n - n % FN_ACCUMULATORS;
    double acc[FN_ACCUMULATORS] = {0};
    for (ptrdiff_t i = 0; i < body; i += FN_ACCUMULATORS)
        for (int j = 0; j < FN_ACCUMULATORS; j++)
            acc[j] += (double)x[i + j];
    double sum = fn_sum_accumulators(acc);
    for (ptrdiff_t i = body; i < n; i++)
        sum += (double)x[i];
    return sum;
}

/* Exact two-pass statistics of n <= FN_STATS_BLOCK values in float64: the mean, then the sums of the
 * deviations (which correct the mean for the rounding of the first pass) and of their squares.  Each sum is
 * a loop of its own: GCC vectorizes a loop with one reduction but leaves one that updates two arrays
 * scalar. */
FN_INLINE fn_stats FN_NAME(fn_exact_block_stats)(const FN_T *restrict x, ptrdiff_t n)
{
    const ptrdiff_t body = n - n % FN_ACCUMULATORS;
    const double shift = FN_NAME(fn_exact_sum)(x, n) / (double)n;
    double acc[FN_ACCUMULATORS] = {0};
    for (ptrdiff_t i = 0; i < body; i += FN_ACCUMULATORS)
        for (int j = 0; j < FN_ACCUMULATORS; j++)
            acc[j] += (double)x[i + j] - shift;
    double s1 = fn_sum_accumulators(acc);
    for (int j = 0; j < FN_ACCUMULATORS; j++)
        acc[j] = 0.0;
    for (ptrdiff_t i = 0; i < body; i += FN_ACCUMULATORS)
        for (int j = 0; j < FN_ACCUMULATORS; j++) {
            double d = (double)x[i + j] - shift;
            acc[j] += d * d;
        }
    double s2 = fn_sum_accumulators(acc);
    for (ptrdiff_t i = body; i < n; i++) {
        double d = (double)x[i] - shift;
        s1 += d;
        s2 += d * d;
    }
    return fn_stats_from_centred((double)n, shift, s1, s2);
}

/* Statistics of n <= FN_STATS_BLOCK values.
 *
 * float32: the centred sums in float32 lanes around a shift, the mean of the block's first FN_SHIFT_HEAD
 * values, usually within a few standard deviations of the block's mean; then x - shift is exact for values
 * within a factor of 2 of it and s1^2 / n is a small part of s2.  The result is accepted when the
 * cancellation is bounded (FN_MAX_CANCELLATION); otherwise the sweep is repeated with the mean it found as
 * the shift.  Blocks whose squares could overflow or underflow float32 (|x - mean| beyond ~1e19 or below
 * ~1e-15, constant blocks, NaN, inf) get the exact float64 two-pass, as float64 blocks always do. */
FN_INLINE fn_stats FN_NAME(fn_block_stats)(const FN_T *x, ptrdiff_t n)
{
#if FN_IS_F32
    const ptrdiff_t head = n < FN_SHIFT_HEAD ? n : FN_SHIFT_HEAD;
    double head_sum = 0.0;
    for (ptrdiff_t j = 0; j < head; j++)
        head_sum += (double)x[j];
    float shift = (float)(head_sum / (double)head);
    for (int sweep = 0; sweep < FN_LANE_SWEEPS; sweep++) {
        double sums[2];
        fn_lane_centred_sums(x, n, shift, sums);
        double m2 = sums[1] - sums[0] * (sums[0] / (double)n);
        if (!(fn_f32_squares_in_range(m2, n) && fn_f32_squares_in_range(sums[1], n)))
            break;
        if (sums[1] <= FN_MAX_CANCELLATION * m2) {
            fn_stats s = {(double)n, (double)shift + sums[0] / (double)n, m2};
            return s;
        }
        shift = (float)((double)shift + sums[0] / (double)n);
    }
#endif
    return FN_NAME(fn_exact_block_stats)(x, n);
}

/* Statistics of any number of contiguous values, block by block in a fixed order. */
FN_INLINE fn_stats FN_NAME(fn_run_stats)(const FN_T *x, ptrdiff_t n)
{
    fn_stats s = fn_stats_empty();
    for (ptrdiff_t start = 0; start < n; start += FN_STATS_BLOCK) {
        ptrdiff_t len = n - start < FN_STATS_BLOCK ? n - start : FN_STATS_BLOCK;
        fn_stats_merge(&s, FN_NAME(fn_block_stats)(x + start, len));
    }
    return s;
}

/* sum(x^2) in FN_ACCUMULATORS float64 accumulators. */
FN_INLINE double FN_NAME(fn_exact_sum_squares)(const FN_T *restrict x, ptrdiff_t n)
{
    double acc[FN_ACCUMULATORS] = {0};
    ptrdiff_t i = 0;
    for (; i + FN_ACCUMULATORS <= n; i += FN_ACCUMULATORS)
        for (int j = 0; j < FN_ACCUMULATORS; j++) {
            double v = (double)x[i + j];
            acc[j] += v * v;
        }
    double total = fn_sum_accumulators(acc);
    for (; i < n; i++)
        total += (double)x[i] * (double)x[i];
    return total;
}

/* sum(x^2) of a row or segment, the statistic of RMS normalization: in float32 lanes for float32 unless the
 * squares could overflow or underflow float32 (or x holds NaN or inf), else exactly. */
FN_INLINE double FN_NAME(fn_sum_squares)(const FN_T *x, ptrdiff_t n)
{
#if FN_IS_F32
    double total = fn_lane_sum_squares(x, n);
    if (fn_f32_squares_in_range(total, n))
        return total;
#endif
    return FN_NAME(fn_exact_sum_squares)(x, n);
}
