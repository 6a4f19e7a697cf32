/* Group normalization kernels (see group_norm.h): how the (n, group) blocks are cut into units of work,
 * and the type-independent steps; the per-element loops and the drivers are group_norm_impl.h,
 * instantiated once per element type.
 */
#include "group_norm.h"

#include <math.h>
#include <stdlib.h>

#include "fn_activation.h"
#include "fn_platform.h"
#include "fn_pool.h"
#include "fn_reductions.h"
#include "fn_stats.h"

/* How the (n, group) blocks are cut into work units, from the shape alone.
 *
 * With at least GN_MIN_BLOCKS blocks, a unit is a whole block: one thread takes its statistics and
 * normalizes it straight away, while the block is still in that core's cache, so x is read from memory
 * once.  With fewer blocks whole blocks would leave threads idle, so each block is cut into units of whole
 * channel planes, or of chunks of one plane (each at least FN_STATS_BLOCK values, about GN_TARGET_UNITS
 * units in all): every unit's partial result is stored, merged per block in unit order, then applied. */
#define GN_MIN_BLOCKS 32
#define GN_TARGET_UNITS 64
/* Chunks of a plane start on 64-byte boundaries (for float; 128 for double). */
#define GN_CHUNK_ALIGN 16
/* Below this many values a parallel region costs more than it saves. */
#define GN_PARALLEL_MIN 32768
/* A block's activation gradient is kept between the backward's two passes up to this size (half a typical
 * L2): recomputed beyond it. */
#define GN_GRAD_CACHE_BYTES ((ptrdiff_t)256 * 1024)

typedef struct {
    ptrdiff_t spatial, groups;
    ptrdiff_t blocks;           /* batch * groups */
    ptrdiff_t group_channels;   /* channels per group, the planes of a block */
    ptrdiff_t units_per_block;  /* 1: stats and apply fused per block */
    ptrdiff_t planes_per_unit;  /* whole planes per unit; 1 when planes are chunked */
    ptrdiff_t chunks_per_plane; /* 1 unless planes are chunked */
    ptrdiff_t chunk_len;        /* values per chunk: spatial unless planes are chunked */
} gn_layout;

/* What one unit of a block covers: values [begin, end) of planes [first_plane, end_plane) of its group;
 * chunk is its index within the plane (0 unless planes are chunked). */
typedef struct {
    ptrdiff_t first_plane, end_plane, begin, end, chunk;
} gn_unit;

static gn_layout gn_plan_layout(ptrdiff_t batch, ptrdiff_t channels, ptrdiff_t spatial, ptrdiff_t groups)
{
    gn_layout l;
    l.spatial = spatial;
    l.groups = groups;
    l.blocks = batch * groups;
    l.group_channels = channels / groups;
    ptrdiff_t units = 1;
    if (l.blocks < GN_MIN_BLOCKS) {
        ptrdiff_t most = l.group_channels * spatial / FN_STATS_BLOCK;
        units = fn_ceil_div(GN_TARGET_UNITS, l.blocks);
        units = units < most ? units : most;
        units = units > 1 ? units : 1;
    }
    if (units <= l.group_channels) {
        l.planes_per_unit = fn_ceil_div(l.group_channels, units);
        l.units_per_block = fn_ceil_div(l.group_channels, l.planes_per_unit);
        l.chunks_per_plane = 1;
        l.chunk_len = spatial;
    } else {
        ptrdiff_t chunks = fn_ceil_div(units, l.group_channels);
        l.planes_per_unit = 1;
        l.chunk_len = fn_ceil_div(fn_ceil_div(spatial, chunks), GN_CHUNK_ALIGN) * GN_CHUNK_ALIGN;
        l.chunks_per_plane = fn_ceil_div(spatial, l.chunk_len);
        l.units_per_block = l.group_channels * l.chunks_per_plane;
    }
    return l;
}

static gn_unit gn_unit_of(const gn_layout *l, ptrdiff_t u)
{
    gn_unit t;
    if (l->chunks_per_plane == 1) {
        t.first_plane = u * l->planes_per_unit;
        t.end_plane = t.first_plane + l->planes_per_unit;
        t.end_plane = t.end_plane < l->group_channels ? t.end_plane : l->group_channels;
        t.chunk = 0;
        t.begin = 0;
        t.end = l->spatial;
    } else {
        t.first_plane = u / l->chunks_per_plane;
        t.end_plane = t.first_plane + 1;
        t.chunk = u % l->chunks_per_plane;
        t.begin = t.chunk * l->chunk_len;
        t.end = t.begin + l->chunk_len < l->spatial ? t.begin + l->chunk_len : l->spatial;
    }
    return t;
}

/* Index of plane p of block b among all (n, c) planes: blocks are consecutive runs of planes. */
static ptrdiff_t gn_plane_index(const gn_layout *l, ptrdiff_t b, ptrdiff_t p)
{
    return b * l->group_channels + p;
}

static ptrdiff_t gn_channel_of(const gn_layout *l, ptrdiff_t b, ptrdiff_t p)
{
    return (b % l->groups) * l->group_channels + p;
}

static void gn_finish_stats(fn_stats s, double eps, double *mean, double *invstd)
{
    *mean = s.mean;
    *invstd = 1.0 / sqrt(fn_stats_var(s) + eps);
}

/* Per (n, c, chunk) partial sums (sum dy, sum dy * (x - mean)), two doubles each. */
static double *gn_plane_sums(const gn_layout *l, double *sums, ptrdiff_t b, ptrdiff_t p, ptrdiff_t chunk)
{
    return sums + 2 * (gn_plane_index(l, b, p) * l->chunks_per_plane + chunk);
}

/* Sum each plane's chunks into its chunk 0 (in chunk order), then the block's dx coefficients:
 * coef[0] = x_scale = -invstd^3 * sum(weight * dy * (x - mean)) / m, coef[1] = shift = -invstd * sum(weight *
 * dy) / m. */
static void gn_block_grad_coefficients(const gn_layout *l, double *sums, ptrdiff_t b, const double *weight,
                                       double invstd, double coef[2])
{
    double weighted_dy = 0.0, weighted_dy_xmu = 0.0;
    for (ptrdiff_t p = 0; p < l->group_channels; p++) {
        double *total = gn_plane_sums(l, sums, b, p, 0);
        for (ptrdiff_t chunk = 1; chunk < l->chunks_per_plane; chunk++) {
            const double *part = gn_plane_sums(l, sums, b, p, chunk);
            total[0] += part[0];
            total[1] += part[1];
        }
        double w = weight ? weight[gn_channel_of(l, b, p)] : 1.0;
        weighted_dy += w * total[0];
        weighted_dy_xmu += w * total[1];
    }
    double m = (double)(l->group_channels * l->spatial);
    coef[0] = -invstd * invstd * invstd * (weighted_dy_xmu / m);
    coef[1] = -invstd * (weighted_dy / m);
}

/* The per-element loops, the drivers and the entry points, for float and double. */
#define FN_IMPL "group_norm_impl.h"
#include "fn_instantiate.h"
