/* Batch normalization kernels: inference with frozen statistics, training forward, backward.
 *
 * Every kernel sees x as a C-contiguous (outer, channels, inner) array and normalizes per channel:
 * channels-first (N, C, *spatial) is (N, C, prod(spatial)); channels-last (N, *spatial, C) is
 * (N * prod(spatial), C, 1).  Per-channel parameters, statistics and gradients are float64 arrays of
 * `channels` values; argument order, NULL parameters, threads and the status follow fn_api.h.
 */
#ifndef FOLDNORM_BATCH_NORM_H
#define FOLDNORM_BATCH_NORM_H

#include <stddef.h>

#include "fn_api.h"

/* y = act(x * alpha + beta) with alpha = weight / sqrt(var + eps), beta = bias - mean * alpha per channel. */
fn_status fn_batch_norm_f32(const float *x, float *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                            const double *mean, const double *var, const double *weight, const double *bias,
                            double eps, fn_activation activation, int num_threads);
fn_status fn_batch_norm_f64(const double *x, double *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                            const double *mean, const double *var, const double *weight, const double *bias,
                            double eps, fn_activation activation, int num_threads);

/* Batch statistics (mean, biased var, invstd = 1 / sqrt(var + eps)) written to mean, var and invstd, then
 * y = act((x - mean) * invstd * weight + bias). */
fn_status fn_batch_norm_train_f32(const float *x, float *y, ptrdiff_t outer, ptrdiff_t channels,
                                  ptrdiff_t inner, const double *weight, const double *bias, double eps,
                                  fn_activation activation, double *mean, double *var, double *invstd,
                                  int num_threads);
fn_status fn_batch_norm_train_f64(const double *x, double *y, ptrdiff_t outer, ptrdiff_t channels,
                                  ptrdiff_t inner, const double *weight, const double *bias, double eps,
                                  fn_activation activation, double *mean, double *var, double *invstd,
                                  int num_threads);

/* Gradient of the training forward: dbias = sum(g), dweight = sum(g * xhat) with
 * xhat = (x - mean) * invstd, and dx = weight * invstd * (g - dbias / n - xhat * dweight / n), where g = dy
 * without an activation and g = dy * act'(xhat * weight + bias) with one: the pre-activation is recomputed
 * from x as the forward computed it (bias is read only then). */
fn_status fn_batch_norm_backward_f32(const float *dy, const float *x, float *dx, ptrdiff_t outer,
                                     ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                                     const double *invstd, const double *weight, const double *bias,
                                     fn_activation activation, double *dweight, double *dbias, int num_threads);
fn_status fn_batch_norm_backward_f64(const double *dy, const double *x, double *dx, ptrdiff_t outer,
                                     ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                                     const double *invstd, const double *weight, const double *bias,
                                     fn_activation activation, double *dweight, double *dbias, int num_threads);

#endif
