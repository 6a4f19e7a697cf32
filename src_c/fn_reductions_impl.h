/* The type-generic reductions of fn_reductions.h, instantiated once per element type (see
 * fn_instantiate.h). */
#ifndef FN_T
#error "fn_reductions_impl.h is instantiated by fn_reductions.h"
#endif

/* sums[0] = sum(dy), sums[1] = sum(dy * (x - centre)) over n values, exactly in float64. */
FN_INLINE void FN_NAME(fn_exact_grad_sums)(const FN_T *restrict dy, const FN_T *restrict x, ptrdiff_t n,
                                           double centre, double sums[2])
{
    const ptrdiff_t body = n - n % FN_ACCUMULATORS;
    double acc[FN_ACCUMULATORS] = {0};
    for (ptrdiff_t i = 0; i < body; i += FN_ACCUMULATORS)
        for (int j = 0; j < FN_ACCUMULATORS; j++)
            acc[j] += (double)dy[i + j] * ((double)x[i + j] - centre);
    double sum_dy_xc = fn_sum_accumulators(acc);
    for (ptrdiff_t i = body; i < n; i++)
        sum_dy_xc += (double)dy[i] * ((double)x[i] - centre);
    sums[0] = FN_NAME(fn_exact_sum)(dy, n);
    sums[1] = sum_dy_xc;
}

/* The batch and group norm reduction: sums[0] = sum(dy), sums[1] = sum(dy * (x - centre)) over n contiguous
 * values, given invstd, the inverse standard deviation of x.  float32: in lanes around the float32 rounding
 * c of the centre, with sum(dy) * (c - centre) added back. */
FN_INLINE void FN_NAME(fn_grad_sums)(const FN_T *dy, const FN_T *x, ptrdiff_t n, double centre, double invstd,
                                     double sums[2])
{
#if FN_IS_F32
    const float c = (float)centre;
    fn_lane_grad_sums(dy, x, n, c, fn_pow2_near(invstd), sums);
    if (isfinite(sums[0]) && isfinite(sums[1])) {
        sums[1] += sums[0] * ((double)c - centre);
        return;
    }
#else
    (void)invstd;
#endif
    FN_NAME(fn_exact_grad_sums)(dy, x, n, centre, sums);
}

/* total[0..3) = sum(g), sum(g * d), sum(d) with g = dy * w (dy when w is NULL) and d = x - centre, exactly in
 * float64. */
FN_INLINE void FN_NAME(fn_exact_row_grad_sums)(const FN_T *restrict dy, const FN_T *restrict x,
                                               const FN_T *restrict w, ptrdiff_t n, double centre,
                                               double total[3])
{
    double sg[FN_ACCUMULATORS] = {0}, sgd[FN_ACCUMULATORS] = {0}, sd[FN_ACCUMULATORS] = {0};
    ptrdiff_t i = 0;
    for (; i + FN_ACCUMULATORS <= n; i += FN_ACCUMULATORS)
        for (int j = 0; j < FN_ACCUMULATORS; j++) {
            double d = (double)x[i + j] - centre;
            double g = w ? (double)dy[i + j] * (double)w[i + j] : (double)dy[i + j];
            sg[j] += g;
            sgd[j] += g * d;
            sd[j] += d;
        }
    total[0] = fn_sum_accumulators(sg);
    total[1] = fn_sum_accumulators(sgd);
    total[2] = fn_sum_accumulators(sd);
    for (; i < n; i++) {
        double d = (double)x[i] - centre, g = w ? (double)dy[i] * (double)w[i] : (double)dy[i];
        total[0] += g;
        total[1] += g * d;
        total[2] += d;
    }
}

/* The layer norm reduction over one row (or segment): sums[0] += sum(g), sums[1] += sum(g * d),
 * sums[2] += sum(d), with g = dy * w (dy when w is NULL) and d = x - centre; invstd is the row's inverse
 * standard deviation. */
FN_INLINE void FN_NAME(fn_row_grad_sums)(const FN_T *dy, const FN_T *x, const FN_T *w, ptrdiff_t n,
                                         FN_T centre, double invstd, double sums[3])
{
    double total[3];
#if FN_IS_F32
    fn_lane_row_grad_sums(dy, x, w, n, centre, fn_pow2_near(invstd), total);
    if (!(isfinite(total[0]) && isfinite(total[1]) && isfinite(total[2])))
        FN_NAME(fn_exact_row_grad_sums)(dy, x, w, n, centre, total);
#else
    (void)invstd;
    FN_NAME(fn_exact_row_grad_sums)(dy, x, w, n, centre, total);
#endif
    sums[0] += total[0];
    sums[1] += total[1];
    sums[2] += total[2];
}

/* sum(g * x) with g = dy * w (dy when w is NULL), exactly in float64. */
FN_INLINE double FN_NAME(fn_exact_row_grad_dot)(const FN_T *restrict dy, const FN_T *restrict x,
                                                const FN_T *restrict w, ptrdiff_t n)
{
    double acc[FN_ACCUMULATORS] = {0};
    ptrdiff_t i = 0;
    for (; i + FN_ACCUMULATORS <= n; i += FN_ACCUMULATORS)
        for (int j = 0; j < FN_ACCUMULATORS; j++) {
            double g = w ? (double)dy[i + j] * (double)w[i + j] : (double)dy[i + j];
            acc[j] += g * (double)x[i + j];
        }
    double total = fn_sum_accumulators(acc);
    for (; i < n; i++)
        total += (w ? (double)dy[i] * (double)w[i] : (double)dy[i]) * (double)x[i];
    return total;
}

/* The RMS norm reduction over one row (or segment): sum(g * x) with g = dy * w (dy when w is NULL); invrms
 * is the row's inverse root mean square. */
FN_INLINE double FN_NAME(fn_row_grad_dot)(const FN_T *dy, const FN_T *x, const FN_T *w, ptrdiff_t n,
                                          double invrms)
{
#if FN_IS_F32
    double total = fn_lane_row_grad_dot(dy, x, w, n, fn_pow2_near(invrms));
    if (isfinite(total))
        return total;
#else
    (void)invrms;
#endif
    return FN_NAME(fn_exact_row_grad_dot)(dy, x, w, n);
}
