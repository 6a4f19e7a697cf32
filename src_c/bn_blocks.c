/* The merges and the running statistics' update of the synchronized batch norm's building blocks (see
 * bn_blocks.h); the per-shard blocks are batch_norm.c's. */
#include "bn_blocks.h"

#include "fn_stats.h"

/* Chan's update over the parts in order, channel by channel: fn_stats_merge, as the kernels merge their
 * pieces, so that merging parts one at a time gives the same bits as merging them all at once. */
void fn_bn_merge_stats(ptrdiff_t parts, ptrdiff_t channels, const double *rows, double *count, double *mean,
                       double *m2)
{
    const ptrdiff_t stride = 1 + 2 * channels;
    double total = 0.0;
    for (ptrdiff_t k = 0; k < parts; k++)
        total += rows[k * stride];
    for (ptrdiff_t c = 0; c < channels; c++) {
        fn_stats s = fn_stats_empty();
        for (ptrdiff_t k = 0; k < parts; k++) {
            const double *row = rows + k * stride;
            const fn_stats part = {row[0], row[1 + c], row[1 + channels + c]};
            fn_stats_merge(&s, part);
        }
        mean[c] = s.mean;
        m2[c] = s.m2;
    }
    *count = total;
}

void fn_bn_update_running(ptrdiff_t channels, double count, const double *mean, const double *m2,
                          double momentum, double *running_mean, double *running_var)
{
    for (ptrdiff_t c = 0; c < channels; c++) {
        if (running_mean != NULL)
            running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c];
        if (running_var != NULL)
            running_var[c] = (1.0 - momentum) * running_var[c] + momentum * (m2[c] / (count - 1.0));
    }
}

void fn_bn_merge_grad_sums(ptrdiff_t parts, ptrdiff_t channels, const double *rows, double *count, double *sum_dy,
                           double *sum_dy_xmu)
{
    const ptrdiff_t stride = 1 + 2 * channels;
    double total = 0.0;
    for (ptrdiff_t c = 0; c < channels; c++)
        sum_dy[c] = sum_dy_xmu[c] = 0.0;
    for (ptrdiff_t k = 0; k < parts; k++) {
        const double *row = rows + k * stride;
        total += row[0];
        for (ptrdiff_t c = 0; c < channels; c++) {
            sum_dy[c] += row[1 + c];
            sum_dy_xmu[c] += row[1 + channels + c];
        }
    }
    *count = total;
}
