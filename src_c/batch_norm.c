/* Batch normalization kernels (see batch_norm.h).
 *
 * Two layouts of the (outer, channels, inner) view, chosen by the shape alone:
 * - planes (inner > 1): each (n, c) plane is contiguous.  A unit is one FN_STATS_BLOCK piece of a plane,
 *   so a few huge planes still give every thread work; its statistics are fn_common.h's
 *   fn_block_stats of that L1-resident piece, and a channel's units are Chan-merged over
 *   (n, piece) in order, as fn_run_stats over each plane followed by a merge over n would.
 * - rows (inner == 1, channels-last): x is an (outer, channels) matrix.  A unit is a fixed block of rows
 *   small enough to stay in cache; per-channel statistics of a block are an exact two-pass over its rows
 *   with the inner loop running along the contiguous channels, and blocks are Chan-merged in order.
 * A single channel is always a plane: (outer, 1, inner) is one contiguous run.
 *
 * The type-generic kernels below the common part are instantiated for float and double by including
 * this file twice with BN_T (the element type) and BN_S (the name suffix) defined.
 */
#ifndef BN_T

#include "batch_norm.h"

#include <math.h>
#include <stdlib.h>

#include "fn_common.h"

#define BN_CAT2(a, b) a##_##b
#define BN_CAT(a, b) BN_CAT2(a, b)
#define BN_FN(name) BN_CAT(name, BN_S)

/* A row block of this many elements (128 KiB of float) stays in a core's L2 between the two passes of
 * its statistics; smaller blocks cost more in per-block partials and merges than they save in misses. */
#define BN_ROW_BLOCK_ELEMS 32768
#define BN_MIN_BLOCK_ROWS 8
/* Row blocks are made smaller (down to BN_MIN_BLOCK_ROWS) until there are this many, so that short
 * inputs still keep every thread busy. */
#define BN_MIN_UNITS 64
/* Channels merged together: the merge loop runs along contiguous channels of each unit's partials. */
#define BN_MERGE_CHANNELS 64

typedef struct {
    ptrdiff_t outer, channels, inner;
    int rows;           /* 1 for the rows layout, 0 for planes */
    ptrdiff_t unit_len; /* rows layout: rows per unit; planes: elements per unit */
    ptrdiff_t pieces;   /* planes: units per plane */
    ptrdiff_t units;
} bn_plan;

typedef struct {
    ptrdiff_t offset;  /* of the unit's first element in x */
    ptrdiff_t len;     /* rows layout: rows; planes: elements */
    ptrdiff_t channel; /* planes only */
} bn_extent;

static ptrdiff_t bn_min(ptrdiff_t a, ptrdiff_t b) { return a < b ? a : b; }

static ptrdiff_t bn_ceil_div(ptrdiff_t a, ptrdiff_t b) { return (a + b - 1) / b; }

static bn_plan bn_make_plan(ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner)
{
    bn_plan p;
    if (channels == 1) {
        inner *= outer;
        outer = 1;
    }
    p.outer = outer;
    p.channels = channels;
    p.inner = inner;
    p.rows = inner == 1;
    if (p.rows) {
        ptrdiff_t len = BN_ROW_BLOCK_ELEMS / channels;
        if (len < BN_MIN_BLOCK_ROWS)
            len = BN_MIN_BLOCK_ROWS;
        while (len > BN_MIN_BLOCK_ROWS && bn_ceil_div(outer, len) < BN_MIN_UNITS)
            len /= 2;
        p.unit_len = len;
        p.pieces = 1;
        p.units = bn_ceil_div(outer, len);
    } else {
        p.unit_len = FN_STATS_BLOCK;
        p.pieces = bn_ceil_div(inner, FN_STATS_BLOCK);
        p.units = outer * channels * p.pieces;
    }
    return p;
}

static bn_extent bn_unit_extent(const bn_plan *p, ptrdiff_t u)
{
    bn_extent e;
    if (p->rows) {
        ptrdiff_t first_row = u * p->unit_len;
        e.offset = first_row * p->channels;
        e.len = bn_min(p->unit_len, p->outer - first_row);
        e.channel = 0;
    } else {
        ptrdiff_t plane = u / p->pieces;
        ptrdiff_t start = (u - plane * p->pieces) * p->unit_len;
        e.offset = plane * p->inner + start;
        e.len = bn_min(p->unit_len, p->inner - start);
        e.channel = plane % p->channels;
    }
    return e;
}

/* Planes: a channel's unit statistics merged over (n, piece) in order.  The merge works on offsets from
 * the channel's first unit mean, so that its roundings are relative to the spread of the unit means
 * rather than to the mean itself (mean 1e4 with std 1e-2 keeps all its digits). */
static void bn_merge_plane_stats(const bn_plan *p, const fn_stats *unit_stats, double *mean, double *var,
                                 int num_threads)
{
    const ptrdiff_t channels = p->channels;
    (void)num_threads;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (ptrdiff_t c = 0; c < channels; c++) {
        const double reference = unit_stats[c * p->pieces].mean;
        fn_stats s = fn_stats_empty();
        for (ptrdiff_t n = 0; n < p->outer; n++) {
            const fn_stats *plane = unit_stats + (n * channels + c) * p->pieces;
            for (ptrdiff_t piece = 0; piece < p->pieces; piece++) {
                fn_stats unit = plane[piece];
                unit.mean -= reference;
                fn_stats_merge(&s, unit);
            }
        }
        mean[c] = reference + s.mean;
        var[c] = fn_stats_var(s);
    }
}

/* Rows: per-channel block statistics (unit u's means and M2s at u * channels) merged over the blocks in
 * order with Chan's update, written as a loop along the channels so that it vectorizes.  As for planes,
 * the running mean is an offset from the first block's mean (mean[c] holds that reference until the
 * end). */
static void bn_merge_row_stats(const bn_plan *p, const double *unit_mean, const double *unit_m2,
                               double *mean, double *var, int num_threads)
{
    const ptrdiff_t channels = p->channels;
    const ptrdiff_t chunks = bn_ceil_div(channels, BN_MERGE_CHANNELS);
    (void)num_threads;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (ptrdiff_t k = 0; k < chunks; k++) {
        const ptrdiff_t c0 = k * BN_MERGE_CHANNELS;
        const ptrdiff_t c1 = bn_min(channels, c0 + BN_MERGE_CHANNELS);
        double offset[BN_MERGE_CHANNELS];
        double count = (double)bn_unit_extent(p, 0).len;
        for (ptrdiff_t c = c0; c < c1; c++) {
            mean[c] = unit_mean[c];
            offset[c - c0] = 0.0;
            var[c] = unit_m2[c];
        }
        for (ptrdiff_t u = 1; u < p->units; u++) {
            const double block = (double)bn_unit_extent(p, u).len;
            const double total = count + block;
            const double mean_weight = block / total;
            const double m2_weight = count * block / total;
            const double *restrict block_mean = unit_mean + u * channels;
            const double *restrict block_m2 = unit_m2 + u * channels;
            for (ptrdiff_t c = c0; c < c1; c++) {
                double delta = (block_mean[c] - mean[c]) - offset[c - c0];
                offset[c - c0] += delta * mean_weight;
                var[c] += block_m2[c] + delta * delta * m2_weight;
            }
            count = total;
        }
        for (ptrdiff_t c = c0; c < c1; c++) {
            mean[c] += offset[c - c0];
            var[c] /= count;
        }
    }
}

/* Planes: a channel's per-unit gradient sums added over (n, piece) in order. */
static void bn_merge_plane_sums(const bn_plan *p, const double *unit_sums, double *sum_dy,
                                double *sum_dy_xc, int num_threads)
{
    const ptrdiff_t channels = p->channels;
    (void)num_threads;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (ptrdiff_t c = 0; c < channels; c++) {
        double a = 0.0, b = 0.0;
        for (ptrdiff_t n = 0; n < p->outer; n++) {
            const double *plane = unit_sums + 2 * (n * channels + c) * p->pieces;
            for (ptrdiff_t piece = 0; piece < p->pieces; piece++) {
                a += plane[2 * piece];
                b += plane[2 * piece + 1];
            }
        }
        sum_dy[c] = a;
        sum_dy_xc[c] = b;
    }
}

/* Rows: unit u's per-channel sums (sum dy at 2 * u * channels, sum dy * (x - mean) right after) added
 * over the units in order. */
static void bn_merge_row_sums(const bn_plan *p, const double *unit_sums, double *sum_dy, double *sum_dy_xc,
                              int num_threads)
{
    const ptrdiff_t channels = p->channels;
    const ptrdiff_t chunks = bn_ceil_div(channels, BN_MERGE_CHANNELS);
    (void)num_threads;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (ptrdiff_t k = 0; k < chunks; k++) {
        const ptrdiff_t c0 = k * BN_MERGE_CHANNELS;
        const ptrdiff_t c1 = bn_min(channels, c0 + BN_MERGE_CHANNELS);
        for (ptrdiff_t c = c0; c < c1; c++) {
            sum_dy[c] = 0.0;
            sum_dy_xc[c] = 0.0;
        }
        for (ptrdiff_t u = 0; u < p->units; u++) {
            const double *restrict a = unit_sums + 2 * u * channels;
            const double *restrict b = a + channels;
            for (ptrdiff_t c = c0; c < c1; c++) {
                sum_dy[c] += a[c];
                sum_dy_xc[c] += b[c];
            }
        }
    }
}

/* BN_RESIDUAL_PASS: whether a block's statistics correct the mean for the rounding of the float64 sum
 * of its values (the rows layout's column statistics; planes use fn_common.h's fn_block_stats).  A row
 * block sums at most 16384 values per channel (BN_ROW_BLOCK_ELEMS over at least 2 channels); for floats
 * (24-bit significands) that sum is exact unless the values span more than 2^15 in magnitude, and within
 * one float64 rounding otherwise, so only double input needs the correction. */
#define BN_T float
#define BN_S f32
#define BN_RESIDUAL_PASS 0
#include "batch_norm.c"
#undef BN_T
#undef BN_S
#undef BN_RESIDUAL_PASS

#define BN_T double
#define BN_S f64
#define BN_RESIDUAL_PASS 1
#include "batch_norm.c"
#undef BN_T
#undef BN_S
#undef BN_RESIDUAL_PASS

#else /* BN_T defined: the type-generic kernels */

/* Per-channel statistics of a block of `rows` rows: an exact two-pass along the
 * channels.  Four rows are folded into the per-channel accumulators at a time, which quarters their
 * loads and stores; the residual pass runs for double input only (see BN_RESIDUAL_PASS). */
FN_VECTOR_KERNEL static void BN_FN(bn_block_column_stats)(const BN_T *restrict x, ptrdiff_t rows,
                                                      ptrdiff_t channels, double *restrict mean,
                                                      double *restrict m2, double *restrict residual)
{
    const ptrdiff_t body = rows - rows % 4;
    for (ptrdiff_t c = 0; c < channels; c++)
        mean[c] = 0.0;
    for (ptrdiff_t r = 0; r < body; r += 4) {
        const BN_T *restrict a = x + r * channels;
        const BN_T *restrict b = a + channels;
        const BN_T *restrict d = b + channels;
        const BN_T *restrict e = d + channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            mean[c] += ((double)a[c] + (double)b[c]) + ((double)d[c] + (double)e[c]);
    }
    for (ptrdiff_t r = body; r < rows; r++) {
        const BN_T *restrict a = x + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            mean[c] += (double)a[c];
    }
    for (ptrdiff_t c = 0; c < channels; c++) {
        mean[c] /= (double)rows;
        residual[c] = 0.0;
        m2[c] = 0.0;
    }

#if BN_RESIDUAL_PASS
    for (ptrdiff_t r = 0; r < rows; r++) {
        const BN_T *restrict a = x + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            residual[c] += (double)a[c] - mean[c];
    }
#endif
    for (ptrdiff_t r = 0; r < body; r += 4) {
        const BN_T *restrict a = x + r * channels;
        const BN_T *restrict b = a + channels;
        const BN_T *restrict d = b + channels;
        const BN_T *restrict e = d + channels;
        for (ptrdiff_t c = 0; c < channels; c++) {
            double da = (double)a[c] - mean[c], db = (double)b[c] - mean[c];
            double dd = (double)d[c] - mean[c], de = (double)e[c] - mean[c];
            m2[c] += (da * da + db * db) + (dd * dd + de * de);
        }
    }
    for (ptrdiff_t r = body; r < rows; r++) {
        const BN_T *restrict a = x + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++) {
            double da = (double)a[c] - mean[c];
            m2[c] += da * da;
        }
    }
    for (ptrdiff_t c = 0; c < channels; c++) {
        double s1 = residual[c];
        double v = m2[c] - s1 * (s1 / (double)rows);
        mean[c] += s1 / (double)rows;
        m2[c] = (!(v > 0.0) && v == v) ? 0.0 : v;
    }
}

/* The statistics and the gradient sums of one plane unit, compiled for the vector target. */
FN_VECTOR_KERNEL static fn_stats BN_FN(bn_unit_stats)(const BN_T *x, ptrdiff_t n)
{
    return BN_FN(fn_block_stats)(x, n);
}

FN_VECTOR_KERNEL static void BN_FN(bn_unit_grad_sums)(const BN_T *dy, const BN_T *x, ptrdiff_t n,
                                                      double mean, double invstd, double sums[2])
{
    BN_FN(fn_grad_sums)(dy, x, n, mean, invstd, sums);
}

/* Batch mean and biased variance of every channel: per-unit statistics, then the fixed-order merge. */
static int BN_FN(bn_statistics)(const BN_T *x, const bn_plan *p, double *mean, double *var,
                                int num_threads)
{
    const ptrdiff_t units = p->units;
    (void)num_threads;
    if (!p->rows) {
        fn_stats *unit_stats = malloc((size_t)units * sizeof(fn_stats));
        if (unit_stats == NULL)
            return FN_BN_NOMEM;
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (ptrdiff_t u = 0; u < units; u++) {
            bn_extent e = bn_unit_extent(p, u);
            unit_stats[u] = BN_FN(bn_unit_stats)(x + e.offset, e.len);
        }
        bn_merge_plane_stats(p, unit_stats, mean, var, num_threads);
        free(unit_stats);
        return FN_BN_OK;
    }

    const ptrdiff_t channels = p->channels;
    double *unit_partials = malloc((size_t)units * (size_t)channels * 2 * sizeof(double));
    if (unit_partials == NULL)
        return FN_BN_NOMEM;
    double *unit_mean = unit_partials;
    double *unit_m2 = unit_partials + units * channels;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        double *residual = malloc((size_t)channels * sizeof(double));
        if (residual == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (ptrdiff_t u = 0; u < units; u++) {
            if (residual == NULL)
                continue;
            bn_extent e = bn_unit_extent(p, u);
            BN_FN(bn_block_column_stats)(x + e.offset, e.len, channels, unit_mean + u * channels,
                                         unit_m2 + u * channels, residual);
        }
        free(residual);
    }
    if (!failed)
        bn_merge_row_stats(p, unit_mean, unit_m2, mean, var, num_threads);
    free(unit_partials);
    return failed ? FN_BN_NOMEM : FN_BN_OK;
}

/* y = (x - shift) * alpha + beta along one run of a channel. */
FN_INLINE void BN_FN(bn_shifted_run)(const BN_T *restrict x, BN_T *restrict y, ptrdiff_t n, BN_T shift,
                                     BN_T alpha, BN_T beta)
{
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = (x[i] - shift) * alpha + beta;
}

FN_INLINE void BN_FN(bn_affine_run)(const BN_T *restrict x, BN_T *restrict y, ptrdiff_t n, BN_T alpha,
                                    BN_T beta)
{
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = x[i] * alpha + beta;
}

FN_VECTOR_KERNEL static void BN_FN(bn_shifted_rows)(const BN_T *restrict x, BN_T *restrict y, ptrdiff_t rows,
                                                    ptrdiff_t channels, const BN_T *restrict shift,
                                                    const BN_T *restrict alpha, const BN_T *restrict beta)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const BN_T *restrict xr = x + r * channels;
        BN_T *restrict yr = y + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            yr[c] = (xr[c] - shift[c]) * alpha[c] + beta[c];
    }
}

FN_VECTOR_KERNEL static void BN_FN(bn_affine_rows)(const BN_T *restrict x, BN_T *restrict y, ptrdiff_t rows,
                                                   ptrdiff_t channels, const BN_T *restrict alpha,
                                                   const BN_T *restrict beta)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const BN_T *restrict xr = x + r * channels;
        BN_T *restrict yr = y + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            yr[c] = xr[c] * alpha[c] + beta[c];
    }
}

/* One run of a plane: y = (x - shift) * alpha + beta, or x * alpha + beta when shift is NULL. */
FN_VECTOR_KERNEL static void BN_FN(bn_plane_run)(const BN_T *x, BN_T *y, ptrdiff_t n, const BN_T *shift,
                                                 ptrdiff_t c, const BN_T *alpha, const BN_T *beta)
{
    if (shift != NULL)
        BN_FN(bn_shifted_run)(x, y, n, shift[c], alpha[c], beta[c]);
    else
        BN_FN(bn_affine_run)(x, y, n, alpha[c], beta[c]);
}

/* The one pass over x that writes y: y = (x - shift) * alpha + beta per channel, or x * alpha + beta
 * when shift is NULL.  A large output of planes is computed piece by piece into L1 and streamed out. */
static void BN_FN(bn_apply)(const BN_T *x, BN_T *y, const bn_plan *p, const BN_T *shift,
                            const BN_T *alpha, const BN_T *beta, int num_threads)
{
    const ptrdiff_t units = p->units;
    const int stream = !p->rows && fn_streams(p->outer * p->channels * p->inner, sizeof(BN_T));
    (void)num_threads;
#pragma omp parallel num_threads(num_threads)
    {
        BN_T piece[FN_STATS_BLOCK];
#pragma omp for schedule(static)
        for (ptrdiff_t u = 0; u < units; u++) {
            bn_extent e = bn_unit_extent(p, u);
            if (p->rows && shift != NULL)
                BN_FN(bn_shifted_rows)(x + e.offset, y + e.offset, e.len, p->channels, shift, alpha, beta);
            else if (p->rows)
                BN_FN(bn_affine_rows)(x + e.offset, y + e.offset, e.len, p->channels, alpha, beta);
            else if (stream) {
                BN_FN(bn_plane_run)(x + e.offset, piece, e.len, shift, e.channel, alpha, beta);
                BN_FN(fn_stream_store)(y + e.offset, piece, e.len);
            } else
                BN_FN(bn_plane_run)(x + e.offset, y + e.offset, e.len, shift, e.channel, alpha, beta);
        }
        if (stream)
            fn_stream_fence();
    }
}

int BN_FN(fn_batch_norm)(const BN_T *x, BN_T *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                         const double *mean, const double *var, const double *weight, const double *bias,
                         double eps, int num_threads)
{
    const bn_plan p = bn_make_plan(outer, channels, inner);
    BN_T *coefs = malloc((size_t)channels * 2 * sizeof(BN_T));
    if (coefs == NULL)
        return FN_BN_NOMEM;
    BN_T *alpha = coefs, *beta = coefs + channels;
    for (ptrdiff_t c = 0; c < channels; c++) {
        double invstd = 1.0 / sqrt(var[c] + eps);
        alpha[c] = (BN_T)((weight ? weight[c] : 1.0) * invstd);
        /* beta from the rounded alpha makes y = (x - mean) * alpha + bias hold near the mean, where the
         * rounding of alpha would otherwise be multiplied by the whole mean. */
        beta[c] = (BN_T)((bias ? bias[c] : 0.0) - mean[c] * (double)alpha[c]);
    }
    BN_FN(bn_apply)(x, y, &p, NULL, alpha, beta, num_threads);
    free(coefs);
    return FN_BN_OK;
}

int BN_FN(fn_batch_norm_train)(const BN_T *x, BN_T *y, ptrdiff_t outer, ptrdiff_t channels,
                               ptrdiff_t inner, const double *weight, const double *bias, double eps,
                               double *mean, double *var, double *invstd, int num_threads)
{
    const bn_plan p = bn_make_plan(outer, channels, inner);
    BN_T *coefs = malloc((size_t)channels * 3 * sizeof(BN_T));
    if (coefs == NULL)
        return FN_BN_NOMEM;
    if (BN_FN(bn_statistics)(x, &p, mean, var, num_threads) != FN_BN_OK) {
        free(coefs);
        return FN_BN_NOMEM;
    }
    BN_T *shift = coefs, *alpha = coefs + channels, *beta = coefs + 2 * channels;
    for (ptrdiff_t c = 0; c < channels; c++) {
        invstd[c] = 1.0 / sqrt(var[c] + eps);
        alpha[c] = (BN_T)((weight ? weight[c] : 1.0) * invstd[c]);
        /* Subtracting the rounded mean first keeps x - shift exact for data far from zero (mean 1e3,
         * std 1 in float32); beta carries the rest of the mean, (mean - shift) * alpha, in float64. */
        shift[c] = (BN_T)mean[c];
        beta[c] = (BN_T)((bias ? bias[c] : 0.0) - (mean[c] - (double)shift[c]) * (double)alpha[c]);
    }
    BN_FN(bn_apply)(x, y, &p, shift, alpha, beta, num_threads);
    free(coefs);
    return FN_BN_OK;
}

/* The per-channel gradient sums of a block of rows, four rows per sweep over the accumulators. */
FN_VECTOR_KERNEL static void BN_FN(bn_grad_sums_rows)(const BN_T *restrict dy, const BN_T *restrict x,
                                                  ptrdiff_t rows, ptrdiff_t channels,
                                                  const double *restrict mean, double *restrict sum_dy,
                                                  double *restrict sum_dy_xc)
{
    const ptrdiff_t body = rows - rows % 4;
    for (ptrdiff_t c = 0; c < channels; c++) {
        sum_dy[c] = 0.0;
        sum_dy_xc[c] = 0.0;
    }
    for (ptrdiff_t r = 0; r < body; r += 4) {
        const ptrdiff_t o = r * channels;
        const BN_T *restrict ga = dy + o, *restrict gb = ga + channels;
        const BN_T *restrict gd = gb + channels, *restrict ge = gd + channels;
        const BN_T *restrict xa = x + o, *restrict xb = xa + channels;
        const BN_T *restrict xd = xb + channels, *restrict xe = xd + channels;
        for (ptrdiff_t c = 0; c < channels; c++) {
            double a = (double)ga[c], b = (double)gb[c], d = (double)gd[c], e = (double)ge[c];
            sum_dy[c] += (a + b) + (d + e);
            sum_dy_xc[c] += (a * ((double)xa[c] - mean[c]) + b * ((double)xb[c] - mean[c])) +
                            (d * ((double)xd[c] - mean[c]) + e * ((double)xe[c] - mean[c]));
        }
    }
    for (ptrdiff_t r = body; r < rows; r++) {
        const BN_T *restrict ga = dy + r * channels;
        const BN_T *restrict xa = x + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++) {
            double a = (double)ga[c];
            sum_dy[c] += a;
            sum_dy_xc[c] += a * ((double)xa[c] - mean[c]);
        }
    }
}

FN_VECTOR_KERNEL static void BN_FN(bn_grad_run)(const BN_T *restrict dy, const BN_T *restrict x,
                                                BN_T *restrict dx, ptrdiff_t n, BN_T alpha, BN_T shift,
                                                BN_T slope, BN_T offset)
{
    for (ptrdiff_t i = 0; i < n; i++)
        dx[i] = (dy[i] + (x[i] - shift) * slope + offset) * alpha;
}

FN_VECTOR_KERNEL static void BN_FN(bn_grad_rows)(const BN_T *restrict dy, const BN_T *restrict x,
                                                 BN_T *restrict dx, ptrdiff_t rows, ptrdiff_t channels,
                                                 const BN_T *restrict alpha,
                                                 const BN_T *restrict shift, const BN_T *restrict slope,
                                                 const BN_T *restrict offset)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const ptrdiff_t o = r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            dx[o + c] = (dy[o + c] + (x[o + c] - shift[c]) * slope[c] + offset[c]) * alpha[c];
    }
}

int BN_FN(fn_batch_norm_backward)(const BN_T *dy, const BN_T *x, BN_T *dx, ptrdiff_t outer,
                                  ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                                  const double *invstd, const double *weight, double *dweight,
                                  double *dbias, int num_threads)
{
    const bn_plan p = bn_make_plan(outer, channels, inner);
    const ptrdiff_t units = p.units;
    const double count = (double)p.outer * (double)p.inner;
    const size_t sums_per_unit = p.rows ? 2 * (size_t)channels : 2;
    double *unit_sums = malloc((size_t)units * sums_per_unit * sizeof(double));
    BN_T *coefs = malloc((size_t)channels * 4 * sizeof(BN_T));
    if (unit_sums == NULL || coefs == NULL) {
        free(unit_sums);
        free(coefs);
        return FN_BN_NOMEM;
    }
    (void)num_threads;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (ptrdiff_t u = 0; u < units; u++) {
        bn_extent e = bn_unit_extent(&p, u);
        double *sums = unit_sums + (size_t)u * sums_per_unit;
        if (p.rows)
            BN_FN(bn_grad_sums_rows)(dy + e.offset, x + e.offset, e.len, channels, mean, sums,
                                     sums + channels);
        else
            BN_FN(bn_unit_grad_sums)(dy + e.offset, x + e.offset, e.len, mean[e.channel], invstd[e.channel],
                                         sums);
    }
    if (p.rows)
        bn_merge_row_sums(&p, unit_sums, dbias, dweight, num_threads);
    else
        bn_merge_plane_sums(&p, unit_sums, dbias, dweight, num_threads);
    free(unit_sums);

    BN_T *alpha = coefs, *shift = coefs + channels, *slope = coefs + 2 * channels;
    BN_T *offset = coefs + 3 * channels;
    for (ptrdiff_t c = 0; c < channels; c++) {
        dweight[c] *= invstd[c];
        /* dx = alpha * (dy + slope * (x - mean) - dbias / n) with (x - mean) = (x - shift) - (mean - shift)
         * as in the forward pass.  Keeping the factor alpha = weight * invstd outside leaves every
         * coefficient on the scale of dy, so none underflows when invstd is tiny (x near 1e30). */
        const double slope64 = -invstd[c] * (dweight[c] / count);
        alpha[c] = (BN_T)((weight ? weight[c] : 1.0) * invstd[c]);
        shift[c] = (BN_T)mean[c];
        slope[c] = (BN_T)slope64;
        /* rest is 0 when the mean is exact in BN_T; skipping the product then keeps an infinite slope (inf
         * in x) from making 0 * inf = NaN of the whole channel, where NumPy's formula gives +-inf. */
        const double rest = mean[c] - (double)shift[c];
        offset[c] = (BN_T)(-(dbias[c] / count) - (rest != 0.0 ? slope64 * rest : 0.0));
    }
    /* As in bn_apply: a large dx of planes is computed into L1 and streamed out. */
    const int stream = !p.rows && fn_streams(p.outer * channels * p.inner, sizeof(BN_T));
#pragma omp parallel num_threads(num_threads)
    {
        BN_T piece[FN_STATS_BLOCK];
#pragma omp for schedule(static)
        for (ptrdiff_t u = 0; u < units; u++) {
            bn_extent e = bn_unit_extent(&p, u);
            const ptrdiff_t c = e.channel;
            if (p.rows)
                BN_FN(bn_grad_rows)(dy + e.offset, x + e.offset, dx + e.offset, e.len, channels, alpha, shift,
                                    slope, offset);
            else if (stream) {
                BN_FN(bn_grad_run)(dy + e.offset, x + e.offset, piece, e.len, alpha[c], shift[c], slope[c],
                                   offset[c]);
                BN_FN(fn_stream_store)(dx + e.offset, piece, e.len);
            } else
                BN_FN(bn_grad_run)(dy + e.offset, x + e.offset, dx + e.offset, e.len, alpha[c], shift[c],
                                   slope[c], offset[c]);
        }
        if (stream)
            fn_stream_fence();
    }
    free(coefs);
    return FN_BN_OK;
}

#endif
