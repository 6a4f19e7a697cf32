/* Layer normalization and RMS normalization over the trailing dimensions of a tensor.
 *
 * Every kernel sees its input as `rows` rows of `cols` contiguous values (C order): ONNX's
 * LayerNormalization / RMSNormalization with axis a normalize each of the prod(shape[:a]) rows over its
 * prod(shape[a:]) values.  weight and bias, and their gradients, are float64 arrays of `cols` values; the
 * statistics (mean, invstd, invrms) are float64 arrays of one value per row.  Argument order, NULL
 * parameters, threads and the status follow fn_api.h.
 *
 *   layer_norm:   y = (x - mean) * invstd * weight + bias,  invstd = 1 / sqrt(var + eps)
 *   rms_norm:     y = x * invrms * weight,                  invrms = 1 / sqrt(mean(x^2) + eps)
 *
 * Statistics are centred sums accumulated in float64 (never float32 E[x^2] - E[x]^2), so float32 rows with a
 * large mean and a tiny spread keep their precision.
 */
#ifndef FOLDNORM_LAYER_NORM_H
#define FOLDNORM_LAYER_NORM_H

#include <stddef.h>

#include "fn_api.h"

/* mean and invstd of every row, then y. */
fn_status fn_layer_norm_f32(const float *x, float *y, ptrdiff_t rows, ptrdiff_t cols, const double *weight,
                            const double *bias, double eps, double *mean, double *invstd, int num_threads);
fn_status fn_layer_norm_f64(const double *x, double *y, ptrdiff_t rows, ptrdiff_t cols, const double *weight,
                            const double *bias, double eps, double *mean, double *invstd, int num_threads);

/* dx, and dweight and dbias summed over the rows.  mean and invstd are as the forward pass returned them;
 * mean only centres the rows, whose exact mean is recomputed, so a mean rounded to float32 costs no
 * accuracy. */
fn_status fn_layer_norm_backward_f32(const float *dy, const float *x, float *dx, ptrdiff_t rows, ptrdiff_t cols,
                                     const double *mean, const double *invstd, const double *weight,
                                     double *dweight, double *dbias, int num_threads);
fn_status fn_layer_norm_backward_f64(const double *dy, const double *x, double *dx, ptrdiff_t rows,
                                     ptrdiff_t cols, const double *mean, const double *invstd,
                                     const double *weight, double *dweight, double *dbias, int num_threads);

/* invrms of every row, then y. */
fn_status fn_rms_norm_f32(const float *x, float *y, ptrdiff_t rows, ptrdiff_t cols, const double *weight,
                          double eps, double *invrms, int num_threads);
fn_status fn_rms_norm_f64(const double *x, double *y, ptrdiff_t rows, ptrdiff_t cols, const double *weight,
                          double eps, double *invrms, int num_threads);

/* dx, and dweight summed over the rows. */
fn_status fn_rms_norm_backward_f32(const float *dy, const float *x, float *dx, ptrdiff_t rows, ptrdiff_t cols,
                                   const double *invrms, const double *weight, double *dweight, int num_threads);
fn_status fn_rms_norm_backward_f64(const double *dy, const double *x, double *dx, ptrdiff_t rows,
                                   ptrdiff_t cols, const double *invrms, const double *weight, double *dweight,
                                   int num_threads);

/* The residual variants: s = x + residual is written to s and normalized as above (y, and mean and invstd, or
 * invrms, of s) in one pass over memory.  s may be the same array as x or as residual, and y the same array
 * as the one of x and residual that s is not; no other overlap is allowed. */
fn_status fn_add_layer_norm_f32(const float *x, const float *residual, float *y, float *s, ptrdiff_t rows,
                                ptrdiff_t cols, const double *weight, const double *bias, double eps, double *mean,
                                double *invstd, int num_threads);
fn_status fn_add_layer_norm_f64(const double *x, const double *residual, double *y, double *s, ptrdiff_t rows,
                                ptrdiff_t cols, const double *weight, const double *bias, double eps, double *mean,
                                double *invstd, int num_threads);
fn_status fn_add_rms_norm_f32(const float *x, const float *residual, float *y, float *s, ptrdiff_t rows,
                              ptrdiff_t cols, const double *weight, double eps, double *invrms, int num_threads);
fn_status fn_add_rms_norm_f64(const double *x, const double *residual, double *y, double *s, ptrdiff_t rows,
                              ptrdiff_t cols, const double *weight, double eps, double *invrms, int num_threads);

/* Their backward passes: dx = the normalization's gradient at s plus ds, the gradient arriving on s itself
 * (dx is the gradient of both x and residual); dweight (and dbias) as above. */
fn_status fn_add_layer_norm_backward_f32(const float *dy, const float *ds, const float *s, float *dx,
                                         ptrdiff_t rows, ptrdiff_t cols, const double *mean, const double *invstd,
                                         const double *weight, double *dweight, double *dbias, int num_threads);
fn_status fn_add_layer_norm_backward_f64(const double *dy, const double *ds, const double *s, double *dx,
                                         ptrdiff_t rows, ptrdiff_t cols, const double *mean, const double *invstd,
                                         const double *weight, double *dweight, double *dbias, int num_threads);
fn_status fn_add_rms_norm_backward_f32(const float *dy, const float *ds, const float *s, float *dx, ptrdiff_t rows,
                                       ptrdiff_t cols, const double *invrms, const double *weight, double *dweight,
                                       int num_threads);
fn_status fn_add_rms_norm_backward_f64(const double *dy, const double *ds, const double *s, double *dx,
                                       ptrdiff_t rows, ptrdiff_t cols, const double *invrms, const double *weight,
                                       double *dweight, int num_threads);

#endif
