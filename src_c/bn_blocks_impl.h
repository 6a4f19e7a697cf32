/* The per-shard building blocks of bn_blocks.h for one element type (see fn_instantiate.h): instantiated by
 * batch_norm.c, whose plan, statistics, apply and gradient passes they are. */
#ifndef FN_T
#error "bn_blocks_impl.h is instantiated by batch_norm.c"
#endif

fn_status FN_NAME(fn_bn_stats)(const FN_T *x, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner, double *row,
                               int num_threads)
{
    const double count = (double)outer * (double)inner;
    double *mean = row + 1, *m2 = row + 1 + channels;
    row[0] = count;
    for (ptrdiff_t c = 0; c < channels; c++)
        mean[c] = m2[c] = 0.0;
    if (count == 0.0)
        return FN_OK;
    const bn_plan p = bn_make_plan(outer, channels, inner);
    if (FN_NAME(bn_statistics)(x, &p, mean, m2, num_threads) != FN_OK)
        return FN_NOMEM;
    for (ptrdiff_t c = 0; c < channels; c++)
        m2[c] *= count;
    return FN_OK;
}

fn_status FN_NAME(fn_bn_elemt)(const FN_T *x, FN_T *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                               const double *mean, const double *invstd, const double *weight, const double *bias,
                               int num_threads)
{
    if (outer == 0 || inner == 0)
        return FN_OK;
    const bn_plan p = bn_make_plan(outer, channels, inner);
    return FN_NAME(bn_normalize)(x, y, &p, mean, invstd, weight, bias, FN_ACT_NONE, num_threads);
}

fn_status FN_NAME(fn_bn_backward_reduce)(const FN_T *dy, const FN_T *x, ptrdiff_t outer, ptrdiff_t channels,
                                         ptrdiff_t inner, const double *mean, const double *invstd, double *row,
                                         int num_threads)
{
    double *sum_dy = row + 1, *sum_dy_xmu = row + 1 + channels;
    row[0] = (double)outer * (double)inner;
    for (ptrdiff_t c = 0; c < channels; c++)
        sum_dy[c] = sum_dy_xmu[c] = 0.0;
    if (outer == 0 || inner == 0)
        return FN_OK;
    const bn_plan p = bn_make_plan(outer, channels, inner);
    return FN_NAME(bn_grad_sums)(dy, x, &p, mean, invstd, NULL, NULL, FN_ACT_NONE, sum_dy, sum_dy_xmu, num_threads);
}

fn_status FN_NAME(fn_bn_backward_elemt)(const FN_T *dy, const FN_T *x, FN_T *dx, ptrdiff_t outer,
                                        ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                                        const double *invstd, const double *sum_dy, const double *sum_dy_xmu,
                                        double count, const double *weight, int num_threads)
{
    if (outer == 0 || inner == 0)
        return FN_OK;
    const bn_plan p = bn_make_plan(outer, channels, inner);
    return FN_NAME(bn_grad_apply)(dy, x, dx, &p, mean, invstd, sum_dy, sum_dy_xmu, count, weight, NULL, FN_ACT_NONE,
                                  num_threads);
}
