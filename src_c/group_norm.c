#include "group_norm.h"

#include <math.h>
#include <stdlib.h>

#include "fn_common.h"

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

static ptrdiff_t ceil_div(ptrdiff_t a, ptrdiff_t b) { return (a + b - 1) / b; }

static gn_layout plan_layout(ptrdiff_t batch, ptrdiff_t channels, ptrdiff_t spatial, ptrdiff_t groups)
{
    gn_layout l;
    l.spatial = spatial;
    l.groups = groups;
    l.blocks = batch * groups;
    l.group_channels = channels / groups;
    ptrdiff_t units = 1;
    if (l.blocks < GN_MIN_BLOCKS) {
        ptrdiff_t most = l.group_channels * spatial / FN_STATS_BLOCK;
        units = ceil_div(GN_TARGET_UNITS, l.blocks);
        units = units < most ? units : most;
        units = units > 1 ? units : 1;
    }
    if (units <= l.group_channels) {
        l.planes_per_unit = ceil_div(l.group_channels, units);
        l.units_per_block = ceil_div(l.group_channels, l.planes_per_unit);
        l.chunks_per_plane = 1;
        l.chunk_len = spatial;
    } else {
        ptrdiff_t chunks = ceil_div(units, l.group_channels);
        l.planes_per_unit = 1;
        l.chunk_len = ceil_div(ceil_div(spatial, chunks), GN_CHUNK_ALIGN) * GN_CHUNK_ALIGN;
        l.chunks_per_plane = ceil_div(spatial, l.chunk_len);
        l.units_per_block = l.group_channels * l.chunks_per_plane;
    }
    return l;
}

static gn_unit unit_of(const gn_layout *l, ptrdiff_t u)
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
static ptrdiff_t plane_index(const gn_layout *l, ptrdiff_t b, ptrdiff_t p)
{
    return b * l->group_channels + p;
}

static ptrdiff_t channel_of(const gn_layout *l, ptrdiff_t b, ptrdiff_t p)
{
    return (b % l->groups) * l->group_channels + p;
}

/* The per-element loops, one set per element type; the drivers below are written once over these. */
typedef struct {
    size_t size;
    fn_stats (*stats)(const void *x, ptrdiff_t n);
    /* y = (x - mean) * scale + shift */
    void (*normalize)(const void *x, void *y, ptrdiff_t n, double mean, double scale, double shift);
    /* the same, written to memory with non-temporal stores (for outputs of FN_STREAM_BYTES or more) */
    void (*normalize_streamed)(const void *x, void *y, ptrdiff_t n, double mean, double scale, double shift);
    /* sums[0] = sum(dy), sums[1] = sum(dy * (x - mean)) */
    void (*grad_sums)(const void *dy, const void *x, ptrdiff_t n, double mean, double invstd, double sums[2]);
    /* dx = dy * dy_scale + (x - mean) * x_scale + shift */
    void (*grad_apply)(const void *dy, const void *x, void *dx, ptrdiff_t n, double dy_scale, double mean,
                       double x_scale, double shift);
} gn_kernels;

/* Both apply loops subtract the mean rounded to T before scaling: for x near the mean that difference is
 * exact, whereas x * alpha + beta with beta = -mean * alpha rounds away the digits that tell the values
 * of a large-mean block apart.  The rounding of the mean itself is folded into the T shift. */
#define GN_DEFINE_KERNELS(T, SUFFIX)                                                                   \
    FN_VECTOR_KERNEL static fn_stats stats_##SUFFIX(const void *x, ptrdiff_t n)                        \
    {                                                                                                  \
        return fn_run_stats_##SUFFIX((const T *)x, n);                                                 \
    }                                                                                                  \
                                                                                                       \
    FN_VECTOR_KERNEL static void normalize_##SUFFIX(const void *xv, void *yv, ptrdiff_t n, double mean, \
                                                    double scale, double shift)                        \
    {                                                                                                  \
        const T *restrict x = (const T *)xv;                                                           \
        T *restrict y = (T *)yv;                                                                       \
        const T center = (T)mean;                                                                      \
        const T alpha = (T)scale;                                                                      \
        const T beta = (T)(shift + ((double)center - mean) * scale);                                   \
        for (ptrdiff_t i = 0; i < n; i++)                                                              \
            y[i] = (x[i] - center) * alpha + beta;                                                     \
    }                                                                                                  \
                                                                                                       \
    FN_VECTOR_KERNEL static void grad_sums_##SUFFIX(const void *dy, const void *x, ptrdiff_t n, double mean, \
                                                    double invstd, double sums[2])                     \
    {                                                                                                  \
        fn_grad_sums_##SUFFIX((const T *)dy, (const T *)x, n, mean, invstd, sums);                     \
    }                                                                                                  \
                                                                                                       \
    FN_VECTOR_KERNEL static void grad_apply_##SUFFIX(const void *dyv, const void *xv, void *dxv,       \
                                                     ptrdiff_t n, double dy_scale, double mean,        \
                                                     double x_scale, double shift)                     \
    {                                                                                                  \
        const T *restrict dy = (const T *)dyv;                                                         \
        const T *restrict x = (const T *)xv;                                                           \
        T *restrict dx = (T *)dxv;                                                                     \
        const T center = (T)mean;                                                                      \
        const T a = (T)dy_scale;                                                                       \
        const T b = (T)x_scale;                                                                        \
        const T c = (T)(shift + ((double)center - mean) * x_scale);                                    \
        for (ptrdiff_t i = 0; i < n; i++)                                                              \
            dx[i] = dy[i] * a + (x[i] - center) * b + c;                                               \
    }                                                                                                  \
                                                                                                       \
    static void normalize_streamed_##SUFFIX(const void *xv, void *yv, ptrdiff_t n, double mean,        \
                                            double scale, double shift)                                \
    {                                                                                                  \
        T piece[FN_STATS_BLOCK];                                                                       \
        for (ptrdiff_t start = 0; start < n; start += FN_STATS_BLOCK) {                                \
            const ptrdiff_t len = n - start < FN_STATS_BLOCK ? n - start : FN_STATS_BLOCK;             \
            normalize_##SUFFIX((const T *)xv + start, piece, len, mean, scale, shift);                 \
            fn_stream_store_##SUFFIX((T *)yv + start, piece, len);                                     \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    static const gn_kernels kernels_##SUFFIX = {sizeof(T), stats_##SUFFIX, normalize_##SUFFIX,         \
                                                normalize_streamed_##SUFFIX, grad_sums_##SUFFIX,       \
                                                grad_apply_##SUFFIX};

GN_DEFINE_KERNELS(float, f32)
GN_DEFINE_KERNELS(double, f64)

static const void *at(const gn_kernels *k, const void *base, ptrdiff_t offset)
{
    return (const char *)base + (size_t)offset * k->size;
}

static void *at_mut(const gn_kernels *k, void *base, ptrdiff_t offset)
{
    return (char *)base + (size_t)offset * k->size;
}

/* ---- forward ---- */

static fn_stats unit_stats(const gn_kernels *k, const gn_layout *l, const void *x, ptrdiff_t b, ptrdiff_t u)
{
    gn_unit t = unit_of(l, u);
    ptrdiff_t start = plane_index(l, b, t.first_plane) * l->spatial + t.begin;
    ptrdiff_t stop = plane_index(l, b, t.end_plane - 1) * l->spatial + t.end;
    return k->stats(at(k, x, start), stop - start);
}

static void finish_stats(fn_stats s, double eps, double *mean, double *invstd)
{
    *mean = s.mean;
    *invstd = 1.0 / sqrt(fn_stats_var(s) + eps);
}

static void normalize_unit(const gn_kernels *k, const gn_layout *l, const void *x, void *y, ptrdiff_t b,
                           ptrdiff_t u, const double *weight, const double *bias, double mean, double invstd,
                           int stream)
{
    gn_unit t = unit_of(l, u);
    for (ptrdiff_t p = t.first_plane; p < t.end_plane; p++) {
        ptrdiff_t c = channel_of(l, b, p);
        ptrdiff_t start = plane_index(l, b, p) * l->spatial + t.begin;
        double scale = weight ? weight[c] * invstd : invstd;
        double shift = bias ? bias[c] : 0.0;
        (stream ? k->normalize_streamed : k->normalize)(at(k, x, start), at_mut(k, y, start), t.end - t.begin,
                                                        mean, scale, shift);
    }
}

static int group_norm(const gn_kernels *k, const void *x, void *y, ptrdiff_t batch, ptrdiff_t channels,
                      ptrdiff_t spatial, ptrdiff_t groups, const double *weight, const double *bias,
                      double eps, double *mean, double *invstd, int num_threads)
{
    const gn_layout l = plan_layout(batch, channels, spatial, groups);
    const ptrdiff_t per_block = l.units_per_block;
    const ptrdiff_t units = l.blocks * per_block;
    const int parallel = batch * channels * spatial >= GN_PARALLEL_MIN;
    /* A large y is streamed to memory: no read of each of its lines before it is written. */
    const int stream = fn_streams(batch * channels * spatial, k->size);
    fn_stats *partial = NULL;
    if (per_block > 1) {
        partial = malloc((size_t)units * sizeof *partial);
        if (partial == NULL)
            return FN_GN_NOMEM;
    }
    (void)num_threads;
    (void)parallel;
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
        if (partial == NULL) {
#pragma omp for schedule(static)
            for (ptrdiff_t b = 0; b < l.blocks; b++) {
                finish_stats(unit_stats(k, &l, x, b, 0), eps, &mean[b], &invstd[b]);
                normalize_unit(k, &l, x, y, b, 0, weight, bias, mean[b], invstd[b], stream);
            }
        } else {
#pragma omp for schedule(static)
            for (ptrdiff_t i = 0; i < units; i++)
                partial[i] = unit_stats(k, &l, x, i / per_block, i % per_block);
#pragma omp for schedule(static)
            for (ptrdiff_t b = 0; b < l.blocks; b++) {
                fn_stats s = fn_stats_empty();
                for (ptrdiff_t u = 0; u < per_block; u++)
                    fn_stats_merge(&s, partial[b * per_block + u]);
                finish_stats(s, eps, &mean[b], &invstd[b]);
            }
#pragma omp for schedule(static)
            for (ptrdiff_t i = 0; i < units; i++) {
                ptrdiff_t b = i / per_block;
                normalize_unit(k, &l, x, y, b, i % per_block, weight, bias, mean[b], invstd[b], stream);
            }
        }
        if (stream)
            fn_stream_fence();
    }
    free(partial);
    return FN_GN_OK;
}

/* ---- backward ---- */

/* Per (n, c, chunk) partial sums (sum dy, sum dy * (x - mean)), two doubles each. */
static double *plane_sums(const gn_layout *l, double *sums, ptrdiff_t b, ptrdiff_t p, ptrdiff_t chunk)
{
    return sums + 2 * (plane_index(l, b, p) * l->chunks_per_plane + chunk);
}

static void unit_grad_sums(const gn_kernels *k, const gn_layout *l, const void *dy, const void *x,
                           ptrdiff_t b, ptrdiff_t u, double mean, double invstd, double *sums)
{
    gn_unit t = unit_of(l, u);
    for (ptrdiff_t p = t.first_plane; p < t.end_plane; p++) {
        ptrdiff_t start = plane_index(l, b, p) * l->spatial + t.begin;
        double *out = plane_sums(l, sums, b, p, t.chunk);
        k->grad_sums(at(k, dy, start), at(k, x, start), t.end - t.begin, mean, invstd, out);
    }
}

/* Sum each plane's chunks into its chunk 0 (in chunk order), then the block's dx coefficients:
 * coef[0] = x_scale = -invstd^3 * sum(weight * dy * (x - mean)) / m, coef[1] = shift = -invstd * sum(weight *
 * dy) / m. */
static void block_grad_coefficients(const gn_layout *l, double *sums, ptrdiff_t b, const double *weight,
                                    double invstd, double coef[2])
{
    double weighted_dy = 0.0, weighted_dy_xmu = 0.0;
    for (ptrdiff_t p = 0; p < l->group_channels; p++) {
        double *total = plane_sums(l, sums, b, p, 0);
        for (ptrdiff_t chunk = 1; chunk < l->chunks_per_plane; chunk++) {
            const double *part = plane_sums(l, sums, b, p, chunk);
            total[0] += part[0];
            total[1] += part[1];
        }
        double w = weight ? weight[channel_of(l, b, p)] : 1.0;
        weighted_dy += w * total[0];
        weighted_dy_xmu += w * total[1];
    }
    double m = (double)(l->group_channels * l->spatial);
    coef[0] = -invstd * invstd * invstd * (weighted_dy_xmu / m);
    coef[1] = -invstd * (weighted_dy / m);
}

static void grad_apply_unit(const gn_kernels *k, const gn_layout *l, const void *dy, const void *x, void *dx,
                            ptrdiff_t b, ptrdiff_t u, const double *weight, double mean, double invstd,
                            const double coef[2])
{
    gn_unit t = unit_of(l, u);
    for (ptrdiff_t p = t.first_plane; p < t.end_plane; p++) {
        ptrdiff_t start = plane_index(l, b, p) * l->spatial + t.begin;
        double dy_scale = weight ? weight[channel_of(l, b, p)] * invstd : invstd;
        k->grad_apply(at(k, dy, start), at(k, x, start), at_mut(k, dx, start), t.end - t.begin, dy_scale,
                      mean, coef[0], coef[1]);
    }
}

static int group_norm_backward(const gn_kernels *k, const void *dy, const void *x, void *dx, ptrdiff_t batch,
                               ptrdiff_t channels, ptrdiff_t spatial, ptrdiff_t groups, const double *mean,
                               const double *invstd, const double *weight, double *dweight, double *dbias,
                               int num_threads)
{
    const gn_layout l = plan_layout(batch, channels, spatial, groups);
    const ptrdiff_t per_block = l.units_per_block;
    const ptrdiff_t units = l.blocks * per_block;
    const int parallel = batch * channels * spatial >= GN_PARALLEL_MIN;
    const size_t nsums = 2 * (size_t)(batch * channels * l.chunks_per_plane);
    double *sums = malloc((nsums + 2 * (size_t)l.blocks) * sizeof *sums);
    if (sums == NULL)
        return FN_GN_NOMEM;
    double *coefs = sums + nsums;
    (void)num_threads;
    (void)parallel;
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
        if (per_block == 1) {
#pragma omp for schedule(static)
            for (ptrdiff_t b = 0; b < l.blocks; b++) {
                unit_grad_sums(k, &l, dy, x, b, 0, mean[b], invstd[b], sums);
                block_grad_coefficients(&l, sums, b, weight, invstd[b], &coefs[2 * b]);
                grad_apply_unit(k, &l, dy, x, dx, b, 0, weight, mean[b], invstd[b], &coefs[2 * b]);
            }
        } else {
#pragma omp for schedule(static)
            for (ptrdiff_t i = 0; i < units; i++) {
                ptrdiff_t b = i / per_block;
                unit_grad_sums(k, &l, dy, x, b, i % per_block, mean[b], invstd[b], sums);
            }
#pragma omp for schedule(static)
            for (ptrdiff_t b = 0; b < l.blocks; b++)
                block_grad_coefficients(&l, sums, b, weight, invstd[b], &coefs[2 * b]);
#pragma omp for schedule(static)
            for (ptrdiff_t i = 0; i < units; i++) {
                ptrdiff_t b = i / per_block;
                grad_apply_unit(k, &l, dy, x, dx, b, i % per_block, weight, mean[b], invstd[b],
                                &coefs[2 * b]);
            }
        }
        /* Per-channel sums over the batch, in batch order; chunk 0 holds each plane's total by now. */
#pragma omp for schedule(static)
        for (ptrdiff_t c = 0; c < channels; c++) {
            ptrdiff_t g = c / l.group_channels, p = c % l.group_channels;
            double sum_dy = 0.0, sum_dy_xhat = 0.0;
            for (ptrdiff_t n = 0; n < batch; n++) {
                ptrdiff_t b = n * groups + g;
                const double *total = plane_sums(&l, sums, b, p, 0);
                sum_dy += total[0];
                sum_dy_xhat += invstd[b] * total[1];
            }
            dbias[c] = sum_dy;
            dweight[c] = sum_dy_xhat;
        }
    }
    free(sums);
    return FN_GN_OK;
}

/* ---- entry points ---- */

int fn_group_norm_f32(const float *x, float *y, ptrdiff_t batch, ptrdiff_t channels, ptrdiff_t spatial,
                      ptrdiff_t groups, const double *weight, const double *bias, double eps, double *mean,
                      double *invstd, int num_threads)
{
    return group_norm(&kernels_f32, x, y, batch, channels, spatial, groups, weight, bias, eps, mean, invstd,
                      num_threads);
}

int fn_group_norm_f64(const double *x, double *y, ptrdiff_t batch, ptrdiff_t channels, ptrdiff_t spatial,
                      ptrdiff_t groups, const double *weight, const double *bias, double eps, double *mean,
                      double *invstd, int num_threads)
{
    return group_norm(&kernels_f64, x, y, batch, channels, spatial, groups, weight, bias, eps, mean, invstd,
                      num_threads);
}

int fn_group_norm_backward_f32(const float *dy, const float *x, float *dx, ptrdiff_t batch,
                               ptrdiff_t channels, ptrdiff_t spatial, ptrdiff_t groups, const double *mean,
                               const double *invstd, const double *weight, double *dweight, double *dbias,
                               int num_threads)
{
    return group_norm_backward(&kernels_f32, dy, x, dx, batch, channels, spatial, groups, mean, invstd,
                               weight, dweight, dbias, num_threads);
}

int fn_group_norm_backward_f64(const double *dy, const double *x, double *dx, ptrdiff_t batch,
                               ptrdiff_t channels, ptrdiff_t spatial, ptrdiff_t groups, const double *mean,
                               const double *invstd, const double *weight, double *dweight, double *dbias,
                               int num_threads)
{
    return group_norm_backward(&kernels_f64, dy, x, dx, batch, channels, spatial, groups, mean, invstd,
                               weight, dweight, dbias, num_threads);
}
