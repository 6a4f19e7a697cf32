/* The building blocks of batch normalization over a batch split into shards (synchronized batch norm), as
 * PyTorch's ATen splits it: each shard's per-channel count, mean and M2; their merge in a fixed order; the
 * normalization of a shard with the merged statistics and the running statistics' update; each shard's
 * per-channel sums of the backward pass, added up in a fixed order; and each shard's dx from the whole
 * batch's sums.  The per-shard pieces are batch_norm_train's and batch_norm_backward's own (batch_norm.c),
 * on the same (outer, channels, inner) view of a shard; conventions follow fn_api.h.  A shard may be empty
 * (outer * inner == 0): its statistics and sums are zeros.  Statistics and sums are float64 for both
 * element types; the merges run in the order of the parts, so that the same parts give the same bits.
 */
#ifndef FOLDNORM_BN_BLOCKS_H
#define FOLDNORM_BN_BLOCKS_H

#include <stddef.h>

#include "fn_api.h"

/* The summary row (count, mean, m2 = sum((x - mean)^2)) of a shard of outer * inner values per channel. */
fn_status fn_bn_stats_f32(const float *x, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner, double *row,
                          int num_threads);
fn_status fn_bn_stats_f64(const double *x, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner, double *row,
                          int num_threads);

/* The statistics of the union of `parts` shards from their rows, merged with Chan's update from the first part
 * to the last; parts of count 0 are skipped.  Writes the total count, mean and m2 (zeros when every part is
 * empty). */
void fn_bn_merge_stats(ptrdiff_t parts, ptrdiff_t channels, const double *rows, double *count, double *mean,
                       double *m2);

/* running = (1 - momentum) * running + momentum * batch per channel, the batch's mean and its unbiased
 * variance m2 / (count - 1); either running array may be NULL. */
void fn_bn_update_running(ptrdiff_t channels, double count, const double *mean, const double *m2,
                          double momentum, double *running_mean, double *running_var);

/* y = (x - mean) * invstd * weight + bias of a shard with the statistics given, computed as
 * batch_norm_train applies its own. */
fn_status fn_bn_elemt_f32(const float *x, float *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                          const double *mean, const double *invstd, const double *weight, const double *bias,
                          int num_threads);
fn_status fn_bn_elemt_f64(const double *x, double *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                          const double *mean, const double *invstd, const double *weight, const double *bias,
                          int num_threads);

/* The summary row (count, sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean))) of a shard, mean and invstd
 * the whole batch's (invstd only scales float32 deviations to unit size, so that values far from it keep
 * their digits). */
fn_status fn_bn_backward_reduce_f32(const float *dy, const float *x, ptrdiff_t outer, ptrdiff_t channels,
                                    ptrdiff_t inner, const double *mean, const double *invstd, double *row,
                                    int num_threads);
fn_status fn_bn_backward_reduce_f64(const double *dy, const double *x, ptrdiff_t outer, ptrdiff_t channels,
                                    ptrdiff_t inner, const double *mean, const double *invstd, double *row,
                                    int num_threads);

/* The counts and sums of `parts` shards' rows added up from the first part to the last. */
void fn_bn_merge_grad_sums(ptrdiff_t parts, ptrdiff_t channels, const double *rows, double *count, double *sum_dy,
                           double *sum_dy_xmu);

/* dx = weight * invstd * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count) of a shard, the
 * statistics, sums and count (>= 1) those of the whole batch, computed as batch_norm_backward computes its
 * own. */
fn_status fn_bn_backward_elemt_f32(const float *dy, const float *x, float *dx, ptrdiff_t outer, ptrdiff_t channels,
                                   ptrdiff_t inner, const double *mean, const double *invstd, const double *sum_dy,
                                   const double *sum_dy_xmu, double count, const double *weight, int num_threads);
fn_status fn_bn_backward_elemt_f64(const double *dy, const double *x, double *dx, ptrdiff_t outer,
                                   ptrdiff_t channels, ptrdiff_t inner, const double *mean, const double *invstd,
                                   const double *sum_dy, const double *sum_dy_xmu, double count,
                                   const double *weight, int num_threads);

#endif
