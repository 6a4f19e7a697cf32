/* The reductions of foldnorm's backward kernels, every family's in one place.
 *
 *   fn_grad_sums      batch and group norm: sum(dy), sum(dy * (x - centre)) over a run of one channel;
 *   fn_row_grad_sums  layer norm: sum(g), sum(g * (x - centre)), sum(x - centre) over a row, g = dy * w;
 *   fn_row_grad_dot   RMS norm: sum(g * x) over a row, g = dy * w.
 *
 * float64 input is summed exactly in FN_ACCUMULATORS float64 accumulators.  float32 input is summed in
 * float32 lanes (fn_stats.h) added up in float64, with the deviations x - centre scaled by
 * fn_pow2_near(invstd) (fn_stats.h) so that their products with the gradient neither underflow nor
 * overflow float32; a run whose lane sums come out infinite or NaN is summed again exactly.
 *
 * Everything here is an FN_INLINE building block that a kernel compiles into its own FN_VECTOR_KERNEL
 * dispatch points.  The type-generic half is fn_reductions_impl.h, instantiated at the end of this file.
 */
#ifndef FOLDNORM_FN_REDUCTIONS_H
#define FOLDNORM_FN_REDUCTIONS_H

#include <math.h>
#include <stddef.h>

#include "fn_platform.h"
#include "fn_stats.h"

/* ---- float32 lanes (checked by the fn_*_impl.h callers) ---- */

/* fn_grad_sums' lanes: around c, the float32 rounding of the centre (x - c is exact for x near it), with
 * x - c scaled by s. */
FN_INLINE void fn_lane_grad_sums(const float *restrict dy, const float *restrict x, ptrdiff_t n, float c,
                                 float s, double sums[2])
{
    double acc1[FN_LANES] = {0}, acc2[FN_LANES] = {0};
    const ptrdiff_t body = fn_lane_body(n);
    for (ptrdiff_t i = 0; i < body; i += FN_LANE_GROUP) {
        const ptrdiff_t len = fn_lane_group(body, i);
        float lane1[FN_LANES] = {0}, lane2[FN_LANES] = {0};
        for (ptrdiff_t k = 0; k < len; k += FN_LANES)
            for (int j = 0; j < FN_LANES; j++)
                lane1[j] += dy[i + k + j];
        for (ptrdiff_t k = 0; k < len; k += FN_LANES)
            for (int j = 0; j < FN_LANES; j++)
                lane2[j] += dy[i + k + j] * ((x[i + k + j] - c) * s);
        fn_lanes_add(acc1, lane1);
        fn_lanes_add(acc2, lane2);
    }
    double sum_dy = fn_lanes_total(acc1), sum_dy_xc = fn_lanes_total(acc2) / s;
    for (ptrdiff_t i = body; i < n; i++) {
        sum_dy += (double)dy[i];
        sum_dy_xc += (double)dy[i] * ((double)x[i] - (double)c);
    }
    sums[0] = sum_dy;
    sums[1] = sum_dy_xc;
}

/* fn_row_grad_sums' lanes (not accumulated into sums: total[0..3) is set), one quantity per loop, the form
 * GCC vectorizes. */
FN_INLINE void fn_lane_row_grad_sums(const float *restrict dy, const float *restrict x, const float *restrict w,
                                     ptrdiff_t n, float centre, float s, double total[3])
{
    double acc_g[FN_LANES] = {0}, acc_gd[FN_LANES] = {0}, acc_d[FN_LANES] = {0};
    const ptrdiff_t body = fn_lane_body(n);
    for (ptrdiff_t i = 0; i < body; i += FN_LANE_GROUP) {
        const ptrdiff_t len = fn_lane_group(body, i);
        float lane_g[FN_LANES] = {0}, lane_gd[FN_LANES] = {0}, lane_d[FN_LANES] = {0};
        const float *dyg = dy + i, *xg = x + i;
        if (w) {
            const float *wg = w + i;
            for (ptrdiff_t k = 0; k < len; k += FN_LANES)
                for (int j = 0; j < FN_LANES; j++)
                    lane_g[j] += dyg[k + j] * wg[k + j];
            for (ptrdiff_t k = 0; k < len; k += FN_LANES)
                for (int j = 0; j < FN_LANES; j++)
                    lane_gd[j] += (dyg[k + j] * wg[k + j]) * ((xg[k + j] - centre) * s);
        } else {
            for (ptrdiff_t k = 0; k < len; k += FN_LANES)
                for (int j = 0; j < FN_LANES; j++)
                    lane_g[j] += dyg[k + j];
            for (ptrdiff_t k = 0; k < len; k += FN_LANES)
                for (int j = 0; j < FN_LANES; j++)
                    lane_gd[j] += dyg[k + j] * ((xg[k + j] - centre) * s);
        }
        for (ptrdiff_t k = 0; k < len; k += FN_LANES)
            for (int j = 0; j < FN_LANES; j++)
                lane_d[j] += (xg[k + j] - centre) * s;
        fn_lanes_add(acc_g, lane_g);
        fn_lanes_add(acc_gd, lane_gd);
        fn_lanes_add(acc_d, lane_d);
    }
    total[0] = fn_lanes_total(acc_g);
    total[1] = fn_lanes_total(acc_gd) / s;
    total[2] = fn_lanes_total(acc_d) / s;
    for (ptrdiff_t i = body; i < n; i++) {
        double d = (double)(x[i] - centre), g = (double)(w ? dy[i] * w[i] : dy[i]);
        total[0] += g;
        total[1] += g * d;
        total[2] += d;
    }
}

/* fn_row_grad_dot's lanes, with x scaled by s. */
FN_INLINE double fn_lane_row_grad_dot(const float *restrict dy, const float *restrict x, const float *restrict w,
                                      ptrdiff_t n, float s)
{
    double acc[FN_LANES] = {0};
    const ptrdiff_t body = fn_lane_body(n);
    for (ptrdiff_t i = 0; i < body; i += FN_LANE_GROUP) {
        const ptrdiff_t len = fn_lane_group(body, i);
        float lane[FN_LANES] = {0};
        const float *dyg = dy + i, *xg = x + i;
        if (w) {
            const float *wg = w + i;
            for (ptrdiff_t k = 0; k < len; k += FN_LANES)
                for (int j = 0; j < FN_LANES; j++)
                    lane[j] += (dyg[k + j] * wg[k + j]) * (xg[k + j] * s);
        } else {
            for (ptrdiff_t k = 0; k < len; k += FN_LANES)
                for (int j = 0; j < FN_LANES; j++)
                    lane[j] += dyg[k + j] * (xg[k + j] * s);
        }
        fn_lanes_add(acc, lane);
    }
    double total = fn_lanes_total(acc) / s;
    for (ptrdiff_t i = body; i < n; i++)
        total += (double)(w ? dy[i] * w[i] : dy[i]) * (double)x[i];
    return total;
}

/* ---- Per element type: fn_grad_sums, fn_row_grad_sums, fn_row_grad_dot ---- */

#define FN_IMPL "fn_reductions_impl.h"
#include "fn_instantiate.h"

#endif
