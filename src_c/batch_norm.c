/* Batch normalization kernels (see batch_norm.h): the plan of the work and the merges of its partial
 * results; the per-element loops are batch_norm_impl.h, instantiated once per element type.
 *
 * Two layouts of the (outer, channels, inner) view, chosen by the shape alone:
 * - planes (inner > 1): each (n, c) plane is contiguous.  A unit is one FN_STATS_BLOCK piece of a plane,
 *   so a few huge planes still give every thread work; its statistics are fn_stats.h's fn_block_stats of
 *   that L1-resident piece, and a channel's units are Chan-merged over (n, piece) in order, as fn_run_stats
 *   over each plane followed by a merge over n would.
 * - rows (inner == 1, channels-last): x is an (outer, channels) matrix.  A unit is a fixed block of rows
 *   small enough to stay in cache; per-channel statistics of a block are an exact two-pass over its rows
 *   with the inner loop running along the contiguous channels, and blocks are Chan-merged in order.
 * A single channel is always a plane: (outer, 1, inner) is one contiguous run.
 */
#include "batch_norm.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "fn_activation.h"
#include "fn_platform.h"
#include "fn_pool.h"
#include "fn_reductions.h"
#include "fn_stats.h"

/* A row block of this many elements (128 KiB of float) stays in a core's L2 between the two passes of
 * its statistics; smaller blocks cost more in per-block partials and merges than they save in misses. */
#define BN_ROW_BLOCK_ELEMS 32768
#define BN_MIN_BLOCK_ROWS 8
/* Row blocks are made smaller (down to BN_MIN_BLOCK_ROWS) until there are this many, so that short
 * inputs still keep every thread busy. */
#define BN_MIN_UNITS 64
/* Channels merged together: the merge loop runs along contiguous channels of each unit's partials. */
#define BN_MERGE_CHANNELS 64
/* The row loops fold this many rows into the per-channel accumulators at a time, which divides their loads
 * and stores by as much. */
#define BN_ROWS_PER_SWEEP 4 /* the loops name the four rows a, b, d, e */

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
        while (len > BN_MIN_BLOCK_ROWS && fn_ceil_div(outer, len) < BN_MIN_UNITS)
            len /= 2;
        p.unit_len = len;
        p.pieces = 1;
        p.units = fn_ceil_div(outer, len);
    } else {
        p.unit_len = FN_STATS_BLOCK;
        p.pieces = fn_ceil_div(inner, FN_STATS_BLOCK);
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
        e.len = fn_min(p->unit_len, p->outer - first_row);
        e.channel = 0;
    } else {
        ptrdiff_t plane = u / p->pieces;
        ptrdiff_t start = (u - plane * p->pieces) * p->unit_len;
        e.offset = plane * p->inner + start;
        e.len = fn_min(p->unit_len, p->inner - start);
        e.channel = plane % p->channels;
    }
    return e;
}

/* Planes: a channel's unit statistics merged over (n, piece) in order.  The merge works on offsets from
 * the channel's first unit mean, so that its roundings are relative to the spread of the unit means
 * rather than to the mean itself (mean 1e4 with std 1e-2 keeps all its digits). */
typedef struct {
    const bn_plan *p;
    const void *partials; /* fn_stats of the units (plane stats), or doubles (the others) */
    const double *unit_m2;
    double *out_a, *out_b;
} bn_merge_job;

static void bn_merge_plane_stats_region(fn_worker *w, void *arg)
{
    const bn_merge_job *j = arg;
    const bn_plan *p = j->p;
    const fn_stats *unit_stats = j->partials;
    const ptrdiff_t channels = p->channels;
    FN_FOR(w, c, channels, p->outer * p->pieces * 4)
    {
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
        j->out_a[c] = reference + s.mean;
        j->out_b[c] = fn_stats_var(s);
    }
}

static void bn_merge_plane_stats(const bn_plan *p, const fn_stats *unit_stats, double *mean, double *var,
                                 int num_threads)
{
    bn_merge_job j = {p, unit_stats, NULL, mean, var};
    fn_team_run(fn_team_size(p->units * 4, num_threads), bn_merge_plane_stats_region, &j);
}

/* Rows: per-channel block statistics (unit u's means and M2s at u * channels) merged over the blocks in
 * order with Chan's update, written as a loop along the channels so that it vectorizes.  As for planes,
 * the running mean is an offset from the first block's mean (mean[c] holds that reference until the
 * end). */
static void bn_merge_row_stats_region(fn_worker *w, void *arg)
{
    const bn_merge_job *j = arg;
    const bn_plan *p = j->p;
    const double *unit_mean = j->partials, *unit_m2 = j->unit_m2;
    double *mean = j->out_a, *var = j->out_b;
    const ptrdiff_t channels = p->channels;
    const ptrdiff_t chunks = fn_ceil_div(channels, BN_MERGE_CHANNELS);
    FN_FOR(w, k, chunks, p->units * BN_MERGE_CHANNELS * 2)
    {
        const ptrdiff_t c0 = k * BN_MERGE_CHANNELS;
        const ptrdiff_t c1 = fn_min(channels, c0 + BN_MERGE_CHANNELS);
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

static void bn_merge_row_stats(const bn_plan *p, const double *unit_mean, const double *unit_m2,
                               double *mean, double *var, int num_threads)
{
    bn_merge_job j = {p, unit_mean, unit_m2, mean, var};
    fn_team_run(fn_team_size(p->units * p->channels * 2, num_threads), bn_merge_row_stats_region, &j);
}

/* Planes: a channel's per-unit gradient sums added over (n, piece) in order. */
static void bn_merge_plane_sums_region(fn_worker *w, void *arg)
{
    const bn_merge_job *j = arg;
    const bn_plan *p = j->p;
    const double *unit_sums = j->partials;
    const ptrdiff_t channels = p->channels;
    FN_FOR(w, c, channels, p->outer * p->pieces * 2)
    {
        double a = 0.0, b = 0.0;
        for (ptrdiff_t n = 0; n < p->outer; n++) {
            const double *plane = unit_sums + 2 * (n * channels + c) * p->pieces;
            for (ptrdiff_t piece = 0; piece < p->pieces; piece++) {
                a += plane[2 * piece];
                b += plane[2 * piece + 1];
            }
        }
        j->out_a[c] = a;
        j->out_b[c] = b;
    }
}

static void bn_merge_plane_sums(const bn_plan *p, const double *unit_sums, double *sum_dy,
                                double *sum_dy_xc, int num_threads)
{
    bn_merge_job j = {p, unit_sums, NULL, sum_dy, sum_dy_xc};
    fn_team_run(fn_team_size(p->units * 2, num_threads), bn_merge_plane_sums_region, &j);
}

/* Rows: unit u's per-channel sums (sum dy at 2 * u * channels, sum dy * (x - mean) right after) added
 * over the units in order. */
static void bn_merge_row_sums_region(fn_worker *w, void *arg)
{
    const bn_merge_job *j = arg;
    const bn_plan *p = j->p;
    const double *unit_sums = j->partials;
    double *sum_dy = j->out_a, *sum_dy_xc = j->out_b;
    const ptrdiff_t channels = p->channels;
    const ptrdiff_t chunks = fn_ceil_div(channels, BN_MERGE_CHANNELS);
    FN_FOR(w, k, chunks, p->units * BN_MERGE_CHANNELS * 2)
    {
        const ptrdiff_t c0 = k * BN_MERGE_CHANNELS;
        const ptrdiff_t c1 = fn_min(channels, c0 + BN_MERGE_CHANNELS);
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

static void bn_merge_row_sums(const bn_plan *p, const double *unit_sums, double *sum_dy, double *sum_dy_xc,
                              int num_threads)
{
    bn_merge_job j = {p, unit_sums, NULL, sum_dy, sum_dy_xc};
    fn_team_run(fn_team_size(p->units * p->channels * 2, num_threads), bn_merge_row_sums_region, &j);
}

/* The backward pass a channel at a time (batch_norm_impl.h): with at least this many channels per thread, planes
 * of at least this many bytes, and a thread's cache of a channel's gradient through the activation up to this
 * size (in L2 on any core). */
#define BN_CHANNELS_PER_THREAD 4
#define BN_CHANNEL_MIN_PLANE_BYTES 2048
#define BN_GRAD_CACHE_BYTES ((ptrdiff_t)256 * 1024)

/* Whether the backward pass goes a channel at a time: planes long enough that a channel's reads are runs the
 * prefetchers follow (a plane of 7x7 floats is three cache lines, shared with the neighbouring channels,
 * which another thread may be writing), and channels enough that whole channels keep every thread busy to
 * the end (the last ones taken leave the others idle for at most a channel's time). */
static int bn_backward_by_channel(const bn_plan *p, size_t element_size, int num_threads)
{
    return !p->rows && p->inner * (ptrdiff_t)element_size >= BN_CHANNEL_MIN_PLANE_BYTES &&
           p->channels >= (ptrdiff_t)BN_CHANNELS_PER_THREAD * (num_threads > 1 ? num_threads : 1);
}

/* The per-element loops and the entry points, for float and double. */
#define FN_IMPL "batch_norm_impl.h"
#include "fn_instantiate.h"

/* The per-shard building blocks of the synchronized batch norm (bn_blocks.h), on the pieces above. */
#include "bn_blocks.h"
#define FN_IMPL "bn_blocks_impl.h"
#include "fn_instantiate.h"
