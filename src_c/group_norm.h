/* Group normalization kernels (instance normalization is the case groups == channels).
 *
 * Every kernel sees x as a C-contiguous (batch, channels, spatial) array, spatial being the product of the
 * spatial dims (1 when there are none).  The channels split into `groups` consecutive groups of
 * channels / groups channels; statistics are taken per (n, group) block, which is contiguous in memory.
 * Per-block statistics (mean, invstd) are float64 arrays of batch * groups values; per-channel weight,
 * bias and their gradients are float64 arrays of `channels` values.  Argument order, NULL parameters,
 * threads and the status follow fn_api.h.
 */
#ifndef FOLDNORM_GROUP_NORM_H
#define FOLDNORM_GROUP_NORM_H

#include <stddef.h>

#include "fn_api.h"

/* mean, invstd = 1 / sqrt(var + eps) per (n, group) (population variance), then
 * y = act((x - mean) * invstd * weight[c] + bias[c]). */
fn_status fn_group_norm_f32(const float *x, float *y, ptrdiff_t batch, ptrdiff_t channels, ptrdiff_t spatial,
                            ptrdiff_t groups, const double *weight, const double *bias, double eps,
                            fn_activation activation, double *mean, double *invstd, int num_threads);
fn_status fn_group_norm_f64(const double *x, double *y, ptrdiff_t batch, ptrdiff_t channels, ptrdiff_t spatial,
                            ptrdiff_t groups, const double *weight, const double *bias, double eps,
                            fn_activation activation, double *mean, double *invstd, int num_threads);

/* Gradient of the forward with m = channels / groups * spatial values per block and xhat = (x - mean) *
 * invstd: dbias[c] = sum(dy), dweight[c] = sum(dy * xhat) over n and spatial, and per block
 * dx = invstd * (weight[c] * dy - mean_block(weight * dy) - xhat * mean_block(weight * dy * xhat)).  With an
 * activation, dy is the gradient of act(y) and g = dy * act'(y), y recomputed from x as the forward computed
 * it (bias is read only then), takes dy's place. */
fn_status fn_group_norm_backward_f32(const float *dy, const float *x, float *dx, ptrdiff_t batch,
                                     ptrdiff_t channels, ptrdiff_t spatial, ptrdiff_t groups,
                                     const double *mean, const double *invstd, const double *weight,
                                     const double *bias, fn_activation activation, double *dweight,
                                     double *dbias, int num_threads);
fn_status fn_group_norm_backward_f64(const double *dy, const double *x, double *dx, ptrdiff_t batch,
                                     ptrdiff_t channels, ptrdiff_t spatial, ptrdiff_t groups,
                                     const double *mean, const double *invstd, const double *weight,
                                     const double *bias, fn_activation activation, double *dweight,
                                     double *dbias, int num_threads);

#endif
