/* Batch normalization kernels: inference with frozen statistics, training forward, backward.
 *
 * Every kernel sees x as a C-contiguous (outer, channels, inner) array and normalizes per channel:
 * channels-first (N, C, *spatial) is (N, C, prod(spatial)); channels-last (N, *spatial, C) is
 * (N * prod(spatial), C, 1).  Per-channel parameters and statistics are float64 arrays of `channels`
 * values; weight and bias may be NULL (1 and 0).
 *
 * Results are bit-identical for any num_threads: work is cut into units whose size depends on the shape
 * only, per-unit partial results are stored and merged in a fixed order.
 *
 * Each function returns FN_BN_OK, or FN_BN_NOMEM when its scratch memory could not be allocated (then
 * the outputs are unspecified).
 */
#ifndef FOLDNORM_BATCH_NORM_H
#define FOLDNORM_BATCH_NORM_H

#include <stddef.h>

#define FN_BN_OK 0
#define FN_BN_NOMEM 1

/* y = x * alpha + beta with alpha = weight / sqrt(var + eps), beta = bias - mean * alpha per channel. */
int fn_batch_norm_f32(const float *x, float *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                      const double *mean, const double *var, const double *weight, const double *bias,
                      double eps, int num_threads);
int fn_batch_norm_f64(const double *x, double *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                      const double *mean, const double *var, const double *weight, const double *bias,
                      double eps, int num_threads);

/* Batch statistics (mean, biased var, invstd = 1 / sqrt(var + eps)) written to the three float64 arrays,
 * then y = (x - mean) * invstd * weight + bias. */
int fn_batch_norm_train_f32(const float *x, float *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                            const double *weight, const double *bias, double eps, double *mean, double *var,
                            double *invstd, int num_threads);
int fn_batch_norm_train_f64(const double *x, double *y, ptrdiff_t outer, ptrdiff_t channels,
                            ptrdiff_t inner, const double *weight, const double *bias, double eps,
                            double *mean, double *var, double *invstd, int num_threads);

/* Gradient of the training forward: dbias = sum(dy), dweight = sum(dy * xhat) with
 * xhat = (x - mean) * invstd, and dx = weight * invstd * (dy - dbias / n - xhat * dweight / n);
 * dweight and dbias are float64 arrays of `channels` values. */
int fn_batch_norm_backward_f32(const float *dy, const float *x, float *dx, ptrdiff_t outer,
                               ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                               const double *invstd, const double *weight, double *dweight, double *dbias,
                               int num_threads);
int fn_batch_norm_backward_f64(const double *dy, const double *x, double *dx, ptrdiff_t outer,
                               ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                               const double *invstd, const double *weight, double *dweight, double *dbias,
                               int num_threads);

#endif
