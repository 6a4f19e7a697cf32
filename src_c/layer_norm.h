/* Layer normalization and RMS normalization over the trailing dimensions of a tensor.
 *
 * Every kernel sees its input as `rows` rows of `cols` contiguous values (C order): ONNX's
 * LayerNormalization / RMSNormalization with axis a normalize each of the prod(shape[:a]) rows over its
 * prod(shape[a:]) values.  weight and bias have `cols` values, or are NULL for 1 and 0.
 *
 *   layer_norm:   y = (x - mean) * invstd * weight + bias,  invstd = 1 / sqrt(var + eps)
 *   rms_norm:     y = x * invrms * weight,                  invrms = 1 / sqrt(mean(x^2) + eps)
 *
 * Statistics are centred sums accumulated in float64 (never float32 E[x^2] - E[x]^2), so float32 rows
 * with a large mean and a tiny spread keep their precision.  Results are bit-identical for
 * any num_threads: rows are independent, and column sums (dweight, dbias) are per-chunk float64 partial
 * sums over fixed row chunks, merged in chunk order.
 *
 * The backward kernels and the forward kernels of very wide rows need scratch memory: they return 0 on
 * success and -1 when it cannot be allocated (nothing is written then).
 */
#ifndef FOLDNORM_LAYER_NORM_H
#define FOLDNORM_LAYER_NORM_H

#include <stddef.h>

/* mean and invstd receive one value per row. */
int fn_layer_norm_f32(const float *x, const float *weight, const float *bias, float *y, float *mean,
                      float *invstd, ptrdiff_t rows, ptrdiff_t cols, double eps, int num_threads);
int fn_layer_norm_f64(const double *x, const double *weight, const double *bias, double *y, double *mean,
                      double *invstd, ptrdiff_t rows, ptrdiff_t cols, double eps, int num_threads);

/* mean and invstd as the forward pass returned them (one per row); mean only centres the rows, whose
 * exact mean is recomputed, so a mean rounded to float32 costs no accuracy.  dweight and dbias receive
 * `cols` values each. */
int fn_layer_norm_backward_f32(const float *dy, const float *x, const float *mean, const float *invstd,
                               const float *weight, float *dx, float *dweight, float *dbias, ptrdiff_t rows,
                               ptrdiff_t cols, int num_threads);
int fn_layer_norm_backward_f64(const double *dy, const double *x, const double *mean, const double *invstd,
                               const double *weight, double *dx, double *dweight, double *dbias,
                               ptrdiff_t rows, ptrdiff_t cols, int num_threads);

/* invrms receives one value per row. */
int fn_rms_norm_f32(const float *x, const float *weight, float *y, float *invrms, ptrdiff_t rows,
                    ptrdiff_t cols, double eps, int num_threads);
int fn_rms_norm_f64(const double *x, const double *weight, double *y, double *invrms, ptrdiff_t rows,
                    ptrdiff_t cols, double eps, int num_threads);

int fn_rms_norm_backward_f32(const float *dy, const float *x, const float *invrms, const float *weight,
                             float *dx, float *dweight, ptrdiff_t rows, ptrdiff_t cols, int num_threads);
int fn_rms_norm_backward_f64(const double *dy, const double *x, const double *invrms, const double *weight,
                             double *dx, double *dweight, ptrdiff_t rows, ptrdiff_t cols, int num_threads);

#endif
