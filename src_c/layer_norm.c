/* Layer normalization and RMS normalization (see layer_norm.h).
 *
 * A row of up to FN_LN_WIDE_COLS values is handled by one thread from start to end: its statistics, then
 * the pass that writes it, while it is still in cache.  Wider rows are cut into segments of
 * FN_LN_SEGMENT_COLS values so that a few rows still keep every thread busy: segment statistics are
 * computed in parallel, merged per row in segment order, and the rows are written in a second parallel
 * pass.  Which scheme a shape gets depends on its width alone, never on the thread count.
 *
 * float32 rows are centred with the mean split into a float32 high part and the float32 rounding of the
 * remainder: x - hi is exact for values near the mean, so a row with mean 1e4 and std 1e-2 is normalized
 * to float32 precision rather than to the 1e-3 spacing of float32 numbers near 1e4.
 *
 * Statistics: fn_common.h's fn_run_stats (per L1 block: float32 lanes for float32 rows when accurate,
 * else an exact float64 two-pass; Chan merges).  RMS sums x^2 in float32 lanes added up in float64 for
 * float32 rows (again in float64 when the squares could overflow or underflow), in eight float64
 * accumulators for float64 rows.
 *
 * The loops over a row are plain elementwise loops or single reductions into independent accumulators
 * over contiguous restrict pointers, which gcc and clang vectorize at -O3 without -ffast-math; per-row
 * constants are hoisted, so no element needs a division or a square root.
 */
#include "layer_norm.h"

#include <math.h>
#include <stdlib.h>

#include "fn_common.h"

/* Rows wider than this are cut into segments. */
#define FN_LN_WIDE_COLS ((ptrdiff_t)1 << 16)
/* Values per segment of a wide row: a whole number of statistics blocks. */
#define FN_LN_SEGMENT_COLS ((ptrdiff_t)16 * FN_STATS_BLOCK)
/* Values per row chunk of the backward passes: each chunk sums dweight/dbias into its own float64 row. */
#define FN_LN_CHUNK_VALUES ((ptrdiff_t)1 << 18)
/* At most this many float64 values per partial-sum array (chunks * cols), whatever the row count. */
#define FN_LN_PARTIAL_VALUES ((ptrdiff_t)1 << 21)
/* Rows whose dweight/dbias terms the backward passes add up in the input's precision before adding them
 * to float64 partial sums. */
#define FN_LN_ROW_GROUP 8
/* Tensors smaller than this run on one thread: waking others costs more than they save. */
#define FN_LN_SERIAL_VALUES ((ptrdiff_t)1 << 15)

static ptrdiff_t fn_ceil_div(ptrdiff_t a, ptrdiff_t b) { return (a + b - 1) / b; }

static ptrdiff_t fn_min(ptrdiff_t a, ptrdiff_t b) { return a < b ? a : b; }

/* How a rows x cols problem is cut up; a function of the shape only (plus the thread count, which
 * decides nothing but how many threads share the fixed pieces). */
typedef struct {
    ptrdiff_t rows, cols;
    ptrdiff_t segment_cols, segments; /* column segments per row: 1 for rows up to FN_LN_WIDE_COLS */
    ptrdiff_t chunk_rows, chunks;     /* row chunks of the backward column sums */
    int threads;
} fn_ln_plan;

static fn_ln_plan fn_ln_make_plan(ptrdiff_t rows, ptrdiff_t cols, int num_threads)
{
    fn_ln_plan p;
    p.rows = rows;
    p.cols = cols;
    p.segment_cols = cols > FN_LN_WIDE_COLS ? FN_LN_SEGMENT_COLS : cols;
    p.segments = fn_ceil_div(cols, p.segment_cols);
    ptrdiff_t max_chunks = FN_LN_PARTIAL_VALUES / cols > 1 ? FN_LN_PARTIAL_VALUES / cols : 1;
    ptrdiff_t chunk_rows = fn_ceil_div(FN_LN_CHUNK_VALUES, cols);
    if (chunk_rows < fn_ceil_div(rows, max_chunks))
        chunk_rows = fn_ceil_div(rows, max_chunks);
    p.chunk_rows = fn_min(chunk_rows, rows);
    p.chunks = fn_ceil_div(rows, p.chunk_rows);
    p.threads = rows * cols < FN_LN_SERIAL_VALUES || num_threads < 1 ? 1 : num_threads;
    return p;
}

/* part holds `chunks` rows of `cols` partial sums; afterwards part[0..cols) holds their sums, added in
 * chunk order for every column. */
static void fn_ln_merge_chunks(double *part, ptrdiff_t chunks, ptrdiff_t cols, int threads)
{
    const ptrdiff_t block = 2048;
    const ptrdiff_t blocks = fn_ceil_div(cols, block);
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (ptrdiff_t b = 0; b < blocks; b++) {
        ptrdiff_t k0 = b * block, k1 = fn_min(k0 + block, cols);
        for (ptrdiff_t c = 1; c < chunks; c++) {
            const double *src = part + c * cols;
            for (ptrdiff_t k = k0; k < k1; k++)
                part[k] += src[k];
        }
    }
}

/* The reduction pass of layer_norm_backward over one row (or segment): sums[0] += sum(g),
 * sums[1] += sum(g * d), sums[2] += sum(d), with g = dy * w (dy when w is NULL) and d = x - centre.
 * fn_ln_exact_backward_sums: eight float64 accumulators (float64 rows, and float32 rows whose lanes would
 * not do).  float32 rows sum each group of 128 values in float32 lanes of 8 values, one quantity per loop
 * (the form gcc vectorizes), and the lanes in float64, with d scaled by fn_pow2_near(invstd) (exact; it
 * keeps g * d from underflowing or overflowing); a row whose sums come out infinite or NaN is summed
 * again exactly. */
#define FN_DEFINE_LN_EXACT_BACKWARD_SUMS(T, S)                                                         \
    FN_INLINE void fn_ln_exact_backward_sums_##S(const T *restrict dy, const T *restrict x,            \
                                                 const T *restrict w, ptrdiff_t n, double centre,      \
                                                 double sums[3])                                       \
    {                                                                                                  \
        double sg[8] = {0}, sgd[8] = {0}, sd[8] = {0};                                                 \
        ptrdiff_t i = 0;                                                                               \
        for (; i + 8 <= n; i += 8)                                                                     \
            for (int j = 0; j < 8; j++) {                                                              \
                double d = (double)x[i + j] - centre;                                                  \
                double g = w ? (double)dy[i + j] * (double)w[i + j] : (double)dy[i + j];               \
                sg[j] += g;                                                                            \
                sgd[j] += g * d;                                                                       \
                sd[j] += d;                                                                            \
            }                                                                                          \
        double total_g = fn_sum8(sg), total_gd = fn_sum8(sgd), total_d = fn_sum8(sd);                  \
        for (; i < n; i++) {                                                                           \
            double d = (double)x[i] - centre, g = w ? (double)dy[i] * (double)w[i] : (double)dy[i];    \
            total_g += g;                                                                              \
            total_gd += g * d;                                                                         \
            total_d += d;                                                                              \
        }                                                                                              \
        sums[0] += total_g;                                                                            \
        sums[1] += total_gd;                                                                           \
        sums[2] += total_d;                                                                            \
    }

FN_DEFINE_LN_EXACT_BACKWARD_SUMS(float, f32)
FN_DEFINE_LN_EXACT_BACKWARD_SUMS(double, f64)

FN_VECTOR_KERNEL
static void fn_ln_backward_sums_f32(const float *restrict dy, const float *restrict x, const float *restrict w,
                                    ptrdiff_t n, float centre, double invstd, double sums[3])
{
    const float s = fn_pow2_near(invstd);
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
    double total[3] = {fn_lanes_total(acc_g), fn_lanes_total(acc_gd) / s, fn_lanes_total(acc_d) / s};
    for (ptrdiff_t i = body; i < n; i++) {
        double d = (double)(x[i] - centre), g = (double)(w ? dy[i] * w[i] : dy[i]);
        total[0] += g;
        total[1] += g * d;
        total[2] += d;
    }
    if (!(isfinite(total[0]) && isfinite(total[1]) && isfinite(total[2]))) {
        total[0] = total[1] = total[2] = 0.0;
        fn_ln_exact_backward_sums_f32(dy, x, w, n, centre, total);
    }
    sums[0] += total[0];
    sums[1] += total[1];
    sums[2] += total[2];
}

FN_VECTOR_KERNEL
static void fn_ln_backward_sums_f64(const double *dy, const double *x, const double *w, ptrdiff_t n,
                                    double centre, double invstd, double sums[3])
{
    (void)invstd;
    fn_ln_exact_backward_sums_f64(dy, x, w, n, centre, sums);
}

/* The reduction pass of rms_norm_backward over one row (or segment): sum(g * x) with g = dy * w (dy when
 * w is NULL); exactly in float64, or for float32 rows in float32 lanes summed in float64 with x scaled by
 * fn_pow2_near(invrms), and exactly when that comes out infinite or NaN, as in fn_ln_backward_sums_f32. */
#define FN_DEFINE_RMS_EXACT_BACKWARD_SUM(T, S)                                                         \
    FN_INLINE double fn_rms_exact_backward_sum_##S(const T *restrict dy, const T *restrict x,          \
                                                   const T *restrict w, ptrdiff_t n)                   \
    {                                                                                                  \
        double acc[8] = {0};                                                                           \
        ptrdiff_t i = 0;                                                                               \
        for (; i + 8 <= n; i += 8)                                                                     \
            for (int j = 0; j < 8; j++) {                                                              \
                double g = w ? (double)dy[i + j] * (double)w[i + j] : (double)dy[i + j];               \
                acc[j] += g * (double)x[i + j];                                                        \
            }                                                                                          \
        double total = fn_sum8(acc);                                                                   \
        for (; i < n; i++)                                                                             \
            total += (w ? (double)dy[i] * (double)w[i] : (double)dy[i]) * (double)x[i];                \
        return total;                                                                                  \
    }

FN_DEFINE_RMS_EXACT_BACKWARD_SUM(float, f32)
FN_DEFINE_RMS_EXACT_BACKWARD_SUM(double, f64)

FN_VECTOR_KERNEL
static double fn_rms_backward_sum_f32(const float *restrict dy, const float *restrict x, const float *restrict w,
                                      ptrdiff_t n, double invrms)
{
    const float s = fn_pow2_near(invrms);
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
    return isfinite(total) ? total : fn_rms_exact_backward_sum_f32(dy, x, w, n);
}

FN_VECTOR_KERNEL
static double fn_rms_backward_sum_f64(const double *dy, const double *x, const double *w, ptrdiff_t n,
                                      double invrms)
{
    (void)invrms;
    return fn_rms_exact_backward_sum_f64(dy, x, w, n);
}

/* Sum of squares of a row (or segment) for RMS normalization: eight float64 accumulators. */
#define FN_DEFINE_EXACT_SUM_SQUARES(T, S)                                                              \
    FN_INLINE double fn_exact_sum_squares_##S(const T *restrict x, ptrdiff_t n)                    \
    {                                                                                                  \
        double acc[8] = {0};                                                                           \
        ptrdiff_t i = 0;                                                                               \
        for (; i + 8 <= n; i += 8)                                                                     \
            for (int j = 0; j < 8; j++) {                                                              \
                double v = (double)x[i + j];                                                           \
                acc[j] += v * v;                                                                       \
            }                                                                                          \
        double total = fn_sum8(acc);                                                                   \
        for (; i < n; i++)                                                                             \
            total += (double)x[i] * (double)x[i];                                                      \
        return total;                                                                                  \
    }

FN_DEFINE_EXACT_SUM_SQUARES(float, f32)
FN_DEFINE_EXACT_SUM_SQUARES(double, f64)

/* float32 rows: squares summed in float32 lanes of 8 values, the lanes in float64.  The terms are
 * positive, so each lane is within 8 float32 roundings (1e-6) of its exact sum.  A row whose squares
 * could overflow or underflow float32 (or holds NaN or inf) is summed again in float64. */
FN_INLINE double fn_lane_sum_squares_f32(const float *restrict x, ptrdiff_t n)
{
    double acc[FN_LANES] = {0};
    const ptrdiff_t body = fn_lane_body(n);
    for (ptrdiff_t i = 0; i < body; i += FN_LANE_GROUP) {
        const ptrdiff_t len = fn_lane_group(body, i);
        float lane[FN_LANES] = {0};
        for (ptrdiff_t k = 0; k < len; k += FN_LANES)
            for (int j = 0; j < FN_LANES; j++)
                lane[j] += x[i + k + j] * x[i + k + j];
        fn_lanes_add(acc, lane);
    }
    double total = fn_lanes_total(acc);
    for (ptrdiff_t i = body; i < n; i++)
        total += (double)x[i] * (double)x[i];
    return total;
}

FN_INLINE double fn_sum_squares_f32(const float *x, ptrdiff_t n)
{
    double total = fn_lane_sum_squares_f32(x, n);
    if (fn_f32_squares_in_range(total, n))
        return total;
    return fn_exact_sum_squares_f32(x, n);
}

FN_INLINE double fn_sum_squares_f64(const double *x, ptrdiff_t n)
{
    return fn_exact_sum_squares_f64(x, n);
}

#define FN_DEFINE_LAYER_NORM(T, S)                                                                              \
    /* The row's centre as hi + lo in T, and its 1/sqrt(var + eps). */                                          \
    typedef struct {                                                                                            \
        T hi, lo, invstd;                                                                                       \
    } fn_ln_row_##S;                                                                                            \
                                                                                                                \
    static fn_ln_row_##S fn_ln_row_from_stats_##S(fn_stats s, double eps)                                       \
    {                                                                                                           \
        fn_ln_row_##S row;                                                                                      \
        row.hi = (T)s.mean;                                                                                     \
        row.lo = (T)(s.mean - (double)row.hi);                                                                  \
        row.invstd = (T)(1.0 / sqrt(fn_stats_var(s) + eps));                                                    \
        return row;                                                                                             \
    }                                                                                                           \
                                                                                                                \
    FN_INLINE void fn_ln_apply_centred_##S(const T *restrict x, const T *restrict w, const T *restrict b,       \
                                        T *restrict y, ptrdiff_t n, T hi, T inv)                                \
    {                                                                                                           \
        if (w && b)                                                                                             \
            for (ptrdiff_t i = 0; i < n; i++)                                                                   \
                y[i] = (x[i] - hi) * inv * w[i] + b[i];                                                         \
        else if (w)                                                                                             \
            for (ptrdiff_t i = 0; i < n; i++)                                                                   \
                y[i] = (x[i] - hi) * inv * w[i];                                                                \
        else if (b)                                                                                             \
            for (ptrdiff_t i = 0; i < n; i++)                                                                   \
                y[i] = (x[i] - hi) * inv + b[i];                                                                \
        else                                                                                                    \
            for (ptrdiff_t i = 0; i < n; i++)                                                                   \
                y[i] = (x[i] - hi) * inv;                                                                       \
    }                                                                                                           \
                                                                                                                \
    FN_INLINE void fn_ln_apply_##S(const T *restrict x, const T *restrict w, const T *restrict b,               \
                                T *restrict y, ptrdiff_t n, fn_ln_row_##S row)                                  \
    {                                                                                                           \
        const T hi = row.hi, lo = row.lo, inv = row.invstd;                                                     \
        if (fabs((double)lo * (double)inv) < 0x1p-30) {                                                         \
            /* The low part of the mean is below float32 resolution of the normalized values. */                \
            fn_ln_apply_centred_##S(x, w, b, y, n, hi, inv);                                                    \
            return;                                                                                             \
        }                                                                                                       \
        if (w && b)                                                                                             \
            for (ptrdiff_t i = 0; i < n; i++)                                                                   \
                y[i] = ((x[i] - hi) - lo) * inv * w[i] + b[i];                                                  \
        else if (w)                                                                                             \
            for (ptrdiff_t i = 0; i < n; i++)                                                                   \
                y[i] = ((x[i] - hi) - lo) * inv * w[i];                                                         \
        else if (b)                                                                                             \
            for (ptrdiff_t i = 0; i < n; i++)                                                                   \
                y[i] = ((x[i] - hi) - lo) * inv + b[i];                                                         \
        else                                                                                                    \
            for (ptrdiff_t i = 0; i < n; i++)                                                                   \
                y[i] = ((x[i] - hi) - lo) * inv;                                                                \
    }                                                                                                           \
                                                                                                                \
    /* y = the applied row, written with ordinary stores, or computed piece by piece into L1 and streamed to    \
     * memory when the whole output is large (stream). */                                                       \
    FN_INLINE void fn_ln_write_##S(const T *x, const T *w, const T *b, T *y, ptrdiff_t n, fn_ln_row_##S row,    \
                                   int stream)                                                                  \
    {                                                                                                           \
        if (!stream) {                                                                                          \
            fn_ln_apply_##S(x, w, b, y, n, row);                                                                \
            return;                                                                                             \
        }                                                                                                       \
        T piece[FN_STATS_BLOCK];                                                                                \
        for (ptrdiff_t start = 0; start < n; start += FN_STATS_BLOCK) {                                         \
            const ptrdiff_t len = fn_min(FN_STATS_BLOCK, n - start);                                            \
            fn_ln_apply_##S(x + start, w ? w + start : NULL, b ? b + start : NULL, piece, len, row);            \
            fn_stream_store_##S(y + start, piece, len);                                                         \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    /* The dispatch points: one call per row, or per segment of a wide row, runs the vector target's code       \
     * with the statistics and the apply loop inlined. */                                                       \
    FN_VECTOR_KERNEL static void fn_ln_normalize_row_##S(const T *x, const T *w, const T *b, T *y,              \
                                                         ptrdiff_t cols, double eps, T *mean, T *invstd,        \
                                                         int stream)                                            \
    {                                                                                                           \
        fn_stats s = fn_run_stats_##S(x, cols);                                                                 \
        fn_ln_row_##S row = fn_ln_row_from_stats_##S(s, eps);                                                   \
        *mean = (T)s.mean;                                                                                      \
        *invstd = row.invstd;                                                                                   \
        fn_ln_write_##S(x, w, b, y, cols, row, stream);                                                         \
    }                                                                                                           \
                                                                                                                \
    FN_VECTOR_KERNEL static fn_stats fn_ln_segment_stats_##S(const T *x, ptrdiff_t n)                           \
    {                                                                                                           \
        return fn_run_stats_##S(x, n);                                                                          \
    }                                                                                                           \
                                                                                                                \
    FN_VECTOR_KERNEL static void fn_ln_segment_apply_##S(const T *x, const T *w, const T *b, T *y, ptrdiff_t n, \
                                                         fn_ln_row_##S row, int stream)                         \
    {                                                                                                           \
        fn_ln_write_##S(x, w, b, y, n, row, stream);                                                            \
    }                                                                                                           \
                                                                                                                \
    int fn_layer_norm_##S(const T *x, const T *weight, const T *bias, T *y, T *mean, T *invstd,                 \
                          ptrdiff_t rows, ptrdiff_t cols, double eps, int num_threads)                          \
    {                                                                                                           \
        const fn_ln_plan p = fn_ln_make_plan(rows, cols, num_threads);                                          \
        const int stream = fn_streams(rows * cols, sizeof(T));                                                  \
        if (p.segments == 1) {                                                                                  \
            _Pragma("omp parallel num_threads(p.threads)")                                                      \
            {                                                                                                   \
                _Pragma("omp for schedule(static)")                                                             \
                for (ptrdiff_t r = 0; r < rows; r++)                                                            \
                    fn_ln_normalize_row_##S(x + r * cols, weight, bias, y + r * cols, cols, eps, &mean[r],      \
                                            &invstd[r], stream);                                                \
                if (stream)                                                                                     \
                    fn_stream_fence();                                                                          \
            }                                                                                                   \
            return 0;                                                                                           \
        }                                                                                                       \
        const ptrdiff_t items = rows * p.segments;                                                              \
        fn_stats *stats = (fn_stats *)malloc((size_t)items * sizeof(fn_stats));                                 \
        if (!stats)                                                                                             \
            return -1;                                                                                          \
        _Pragma("omp parallel num_threads(p.threads)")                                                          \
        {                                                                                                       \
            _Pragma("omp for schedule(static)")                                                                 \
            for (ptrdiff_t i = 0; i < items; i++) {                                                             \
                ptrdiff_t r = i / p.segments, c0 = (i % p.segments) * p.segment_cols;                           \
                stats[i] = fn_ln_segment_stats_##S(x + r * cols + c0, fn_min(p.segment_cols, cols - c0));     \
            }                                                                                                   \
            _Pragma("omp for schedule(static)")                                                                 \
            for (ptrdiff_t r = 0; r < rows; r++) {                                                              \
                fn_stats *row_stats = stats + r * p.segments;                                                   \
                for (ptrdiff_t g = 1; g < p.segments; g++)                                                      \
                    fn_stats_merge(&row_stats[0], row_stats[g]);                                                \
                mean[r] = (T)row_stats[0].mean;                                                                 \
                invstd[r] = fn_ln_row_from_stats_##S(row_stats[0], eps).invstd;                                 \
            }                                                                                                   \
            _Pragma("omp for schedule(static)")                                                                 \
            for (ptrdiff_t i = 0; i < items; i++) {                                                             \
                ptrdiff_t r = i / p.segments, c0 = (i % p.segments) * p.segment_cols;                           \
                fn_ln_row_##S row = fn_ln_row_from_stats_##S(stats[r * p.segments], eps);                       \
                fn_ln_segment_apply_##S(x + r * cols + c0, weight ? weight + c0 : NULL,                         \
                                        bias ? bias + c0 : NULL, y + r * cols + c0,                             \
                                        fn_min(p.segment_cols, cols - c0), row, stream);                        \
            }                                                                                                   \
            if (stream)                                                                                         \
                fn_stream_fence();                                                                              \
        }                                                                                                       \
        free(stats);                                                                                            \
        return 0;                                                                                               \
    }                                                                                                           \
                                                                                                                \
    /* part += rows in float64, then rows = 0: the backward passes sum dweight/dbias over FN_LN_ROW_GROUP rows  \
     * in T, then into the chunk's float64 partial sums. */                                                     \
    FN_VECTOR_KERNEL                                                                                            \
    static void fn_ln_flush_columns_##S(double *restrict part, T *restrict rows, ptrdiff_t n)                   \
    {                                                                                                           \
        for (ptrdiff_t i = 0; i < n; i++) {                                                                     \
            part[i] += (double)rows[i];                                                                         \
            rows[i] = 0;                                                                                        \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    /* dx = invstd * (g - mean(g) - xhat * mean(g * xhat)) = a * g + c * xhat + b, with xhat centred on the     \
     * row's exact mean: the given mean plus the residual mean sum(d) / cols. */                                \
    typedef struct {                                                                                            \
        T hi, lo, invstd, a, b, c;                                                                              \
    } fn_ln_grad_row_##S;                                                                                       \
                                                                                                                \
    static fn_ln_grad_row_##S fn_ln_grad_constants_##S(T mean, T invstd, const double sums[3], ptrdiff_t cols)  \
    {                                                                                                           \
        fn_ln_grad_row_##S row;                                                                                 \
        double inv = (double)invstd, residual = sums[2] / (double)cols;                                         \
        double mean_g = sums[0] / (double)cols;                                                                 \
        double mean_gxhat = (sums[1] - residual * sums[0]) * inv / (double)cols;                                \
        row.hi = mean;                                                                                          \
        row.lo = (T)residual;                                                                                   \
        row.invstd = invstd;                                                                                    \
        row.a = invstd;                                                                                         \
        row.b = (T)(-inv * mean_g);                                                                             \
        row.c = (T)(-inv * mean_gxhat);                                                                         \
        return row;                                                                                             \
    }                                                                                                           \
                                                                                                                \
    FN_VECTOR_KERNEL                                                                                            \
    static void fn_ln_backward_apply_##S(const T *restrict dy, const T *restrict x, const T *restrict w,        \
                                         T *restrict dx, T *restrict dweight_rows, T *restrict dbias_rows,      \
                                         ptrdiff_t n, fn_ln_grad_row_##S row)                                   \
    {                                                                                                           \
        const T hi = row.hi, lo = row.lo, inv = row.invstd, a = row.a, b = row.b, c = row.c;                    \
        if (w)                                                                                                  \
            for (ptrdiff_t i = 0; i < n; i++) {                                                                 \
                T xhat = ((x[i] - hi) - lo) * inv;                                                              \
                dx[i] = a * (dy[i] * w[i]) + c * xhat + b;                                                      \
                dweight_rows[i] += dy[i] * xhat;                                                                \
                dbias_rows[i] += dy[i];                                                                         \
            }                                                                                                   \
        else                                                                                                    \
            for (ptrdiff_t i = 0; i < n; i++) {                                                                 \
                T xhat = ((x[i] - hi) - lo) * inv;                                                              \
                dx[i] = a * dy[i] + c * xhat + b;                                                               \
                dweight_rows[i] += dy[i] * xhat;                                                                \
                dbias_rows[i] += dy[i];                                                                         \
            }                                                                                                   \
    }                                                                                                           \
                                                                                                                \
    int fn_layer_norm_backward_##S(const T *dy, const T *x, const T *mean, const T *invstd, const T *weight,    \
                                   T *dx, T *dweight, T *dbias, ptrdiff_t rows, ptrdiff_t cols,                 \
                                   int num_threads)                                                             \
    {                                                                                                           \
        const fn_ln_plan p = fn_ln_make_plan(rows, cols, num_threads);                                          \
        const ptrdiff_t part_values = p.chunks * cols;                                                          \
        const ptrdiff_t row_sums = p.segments > 1 ? 3 * rows * p.segments : 0;                                  \
        double *part = (double *)calloc(1, (size_t)(2 * part_values + row_sums) * sizeof(double)                \
                                               + (size_t)(2 * part_values) * sizeof(T));                        \
        if (!part)                                                                                              \
            return -1;                                                                                          \
        double *sums = part + 2 * part_values;                                                                  \
        T *group = (T *)(sums + row_sums);                                                                      \
        const ptrdiff_t tiles = p.chunks * p.segments;                                                          \
        _Pragma("omp parallel num_threads(p.threads)")                                                          \
        {                                                                                                       \
            if (p.segments > 1) {                                                                               \
                _Pragma("omp for schedule(static)")                                                             \
                for (ptrdiff_t i = 0; i < rows * p.segments; i++) {                                             \
                    ptrdiff_t r = i / p.segments, c0 = (i % p.segments) * p.segment_cols;                       \
                    fn_ln_backward_sums_##S(dy + r * cols + c0, x + r * cols + c0, weight ? weight + c0 : NULL, \
                                            fn_min(p.segment_cols, cols - c0), mean[r], invstd[r],              \
                                            sums + 3 * i);                                                      \
                }                                                                                               \
                _Pragma("omp for schedule(static)")                                                             \
                for (ptrdiff_t r = 0; r < rows; r++)                                                            \
                    for (ptrdiff_t g = 1; g < p.segments; g++)                                                  \
                        for (int j = 0; j < 3; j++)                                                             \
                            sums[3 * r * p.segments + j] += sums[3 * (r * p.segments + g) + j];                 \
            }                                                                                                   \
            _Pragma("omp for schedule(static)")                                                                 \
            for (ptrdiff_t t = 0; t < tiles; t++) {                                                             \
                ptrdiff_t chunk = t / p.segments, c0 = (t % p.segments) * p.segment_cols;                       \
                ptrdiff_t n = fn_min(p.segment_cols, cols - c0);                                                \
                ptrdiff_t r1 = fn_min((chunk + 1) * p.chunk_rows, rows);                                        \
                const T *w = weight ? weight + c0 : NULL;                                                       \
                double *dweight_part = part + chunk * cols + c0;                                                \
                double *dbias_part = part + part_values + chunk * cols + c0;                                    \
                T *dweight_rows = group + chunk * cols + c0;                                                    \
                T *dbias_rows = group + part_values + chunk * cols + c0;                                        \
                for (ptrdiff_t r = chunk * p.chunk_rows; r < r1; r++) {                                         \
                    double row_sums_here[3] = {0.0, 0.0, 0.0};                                                  \
                    const double *s = row_sums_here;                                                            \
                    if (p.segments > 1)                                                                         \
                        s = sums + 3 * r * p.segments;                                                          \
                    else                                                                                        \
                        fn_ln_backward_sums_##S(dy + r * cols, x + r * cols, w, n, mean[r], invstd[r],          \
                                                row_sums_here);                                                 \
                    fn_ln_grad_row_##S row = fn_ln_grad_constants_##S(mean[r], invstd[r], s, cols);             \
                    fn_ln_backward_apply_##S(dy + r * cols + c0, x + r * cols + c0, w, dx + r * cols + c0,      \
                                             dweight_rows, dbias_rows, n, row);                                 \
                    if ((r + 1 - chunk * p.chunk_rows) % FN_LN_ROW_GROUP == 0 || r + 1 == r1) {                 \
                        fn_ln_flush_columns_##S(dweight_part, dweight_rows, n);                                 \
                        fn_ln_flush_columns_##S(dbias_part, dbias_rows, n);                                     \
                    }                                                                                           \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        fn_ln_merge_chunks(part, p.chunks, cols, p.threads);                                                    \
        fn_ln_merge_chunks(part + part_values, p.chunks, cols, p.threads);                                      \
        for (ptrdiff_t k = 0; k < cols; k++) {                                                                  \
            dweight[k] = (T)part[k];                                                                            \
            dbias[k] = (T)part[part_values + k];                                                                \
        }                                                                                                       \
        free(part);                                                                                             \
        return 0;                                                                                               \
    }                                                                                                           \
                                                                                                                \
    FN_INLINE void fn_rms_apply_##S(const T *restrict x, const T *restrict w, T *restrict y, ptrdiff_t n,       \
                                 T invrms)                                                                      \
    {                                                                                                           \
        if (w)                                                                                                  \
            for (ptrdiff_t i = 0; i < n; i++)                                                                   \
                y[i] = x[i] * invrms * w[i];                                                                    \
        else                                                                                                    \
            for (ptrdiff_t i = 0; i < n; i++)                                                                   \
                y[i] = x[i] * invrms;                                                                           \
    }                                                                                                           \
                                                                                                                \
    static T fn_invrms_##S(double sum_squares, ptrdiff_t cols, double eps)                                      \
    {                                                                                                           \
        return (T)(1.0 / sqrt(sum_squares / (double)cols + eps));                                               \
    }                                                                                                           \
                                                                                                                \
    /* As fn_ln_write: ordinary stores, or L1 pieces streamed to memory. */                                     \
    FN_INLINE void fn_rms_write_##S(const T *x, const T *w, T *y, ptrdiff_t n, T invrms, int stream)            \
    {                                                                                                           \
        if (!stream) {                                                                                          \
            fn_rms_apply_##S(x, w, y, n, invrms);                                                               \
            return;                                                                                             \
        }                                                                                                       \
        T piece[FN_STATS_BLOCK];                                                                                \
        for (ptrdiff_t start = 0; start < n; start += FN_STATS_BLOCK) {                                         \
            const ptrdiff_t len = fn_min(FN_STATS_BLOCK, n - start);                                            \
            fn_rms_apply_##S(x + start, w ? w + start : NULL, piece, len, invrms);                              \
            fn_stream_store_##S(y + start, piece, len);                                                         \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    FN_VECTOR_KERNEL static T fn_rms_normalize_row_##S(const T *x, const T *w, T *y, ptrdiff_t cols, double eps, \
                                                       int stream)                                              \
    {                                                                                                           \
        T inv = fn_invrms_##S(fn_sum_squares_##S(x, cols), cols, eps);                                          \
        fn_rms_write_##S(x, w, y, cols, inv, stream);                                                           \
        return inv;                                                                                             \
    }                                                                                                           \
                                                                                                                \
    FN_VECTOR_KERNEL static double fn_rms_segment_sum_squares_##S(const T *x, ptrdiff_t n)                      \
    {                                                                                                           \
        return fn_sum_squares_##S(x, n);                                                                        \
    }                                                                                                           \
                                                                                                                \
    FN_VECTOR_KERNEL static void fn_rms_segment_apply_##S(const T *x, const T *w, T *y, ptrdiff_t n, T invrms,  \
                                                          int stream)                                           \
    {                                                                                                           \
        fn_rms_write_##S(x, w, y, n, invrms, stream);                                                           \
    }                                                                                                           \
                                                                                                                \
    int fn_rms_norm_##S(const T *x, const T *weight, T *y, T *invrms, ptrdiff_t rows, ptrdiff_t cols,           \
                        double eps, int num_threads)                                                            \
    {                                                                                                           \
        const fn_ln_plan p = fn_ln_make_plan(rows, cols, num_threads);                                          \
        const int stream = fn_streams(rows * cols, sizeof(T));                                                  \
        if (p.segments == 1) {                                                                                  \
            _Pragma("omp parallel num_threads(p.threads)")                                                      \
            {                                                                                                   \
                _Pragma("omp for schedule(static)")                                                             \
                for (ptrdiff_t r = 0; r < rows; r++)                                                            \
                    invrms[r] = fn_rms_normalize_row_##S(x + r * cols, weight, y + r * cols, cols, eps, stream); \
                if (stream)                                                                                     \
                    fn_stream_fence();                                                                          \
            }                                                                                                   \
            return 0;                                                                                           \
        }                                                                                                       \
        const ptrdiff_t items = rows * p.segments;                                                              \
        double *sums = (double *)malloc((size_t)items * sizeof(double));                                        \
        if (!sums)                                                                                              \
            return -1;                                                                                          \
        _Pragma("omp parallel num_threads(p.threads)")                                                          \
        {                                                                                                       \
            _Pragma("omp for schedule(static)")                                                                 \
            for (ptrdiff_t i = 0; i < items; i++) {                                                             \
                ptrdiff_t r = i / p.segments, c0 = (i % p.segments) * p.segment_cols;                           \
                sums[i] = fn_rms_segment_sum_squares_##S(x + r * cols + c0, fn_min(p.segment_cols, cols - c0)); \
            }                                                                                                   \
            _Pragma("omp for schedule(static)")                                                                 \
            for (ptrdiff_t r = 0; r < rows; r++) {                                                              \
                for (ptrdiff_t g = 1; g < p.segments; g++)                                                      \
                    sums[r * p.segments] += sums[r * p.segments + g];                                           \
                invrms[r] = fn_invrms_##S(sums[r * p.segments], cols, eps);                                     \
            }                                                                                                   \
            _Pragma("omp for schedule(static)")                                                                 \
            for (ptrdiff_t i = 0; i < items; i++) {                                                             \
                ptrdiff_t r = i / p.segments, c0 = (i % p.segments) * p.segment_cols;                           \
                fn_rms_segment_apply_##S(x + r * cols + c0, weight ? weight + c0 : NULL, y + r * cols + c0,     \
                                         fn_min(p.segment_cols, cols - c0), invrms[r], stream);                 \
            }                                                                                                   \
            if (stream)                                                                                         \
                fn_stream_fence();                                                                              \
        }                                                                                                       \
        free(sums);                                                                                             \
        return 0;                                                                                               \
    }                                                                                                           \
                                                                                                                \
    /* dx = invrms * g - x * invrms^3 * mean(g * x); dweight += dy * x * invrms. */                             \
    FN_VECTOR_KERNEL                                                                                            \
    static void fn_rms_backward_apply_##S(const T *restrict dy, const T *restrict x, const T *restrict w,       \
                                          T *restrict dx, T *restrict dweight_rows, ptrdiff_t n,                \
                                          T invrms, T c)                                                        \
    {                                                                                                           \
        if (w)                                                                                                  \
            for (ptrdiff_t i = 0; i < n; i++) {                                                                 \
                dx[i] = invrms * (dy[i] * w[i]) - c * x[i];                                                     \
                dweight_rows[i] += dy[i] * (x[i] * invrms);                                                     \
            }                                                                                                   \
        else                                                                                                    \
            for (ptrdiff_t i = 0; i < n; i++) {                                                                 \
                dx[i] = invrms * dy[i] - c * x[i];                                                              \
                dweight_rows[i] += dy[i] * (x[i] * invrms);                                                     \
            }                                                                                                   \
    }                                                                                                           \
                                                                                                                \
    static T fn_rms_backward_c_##S(T invrms, double sum_gx, ptrdiff_t cols)                                     \
    {                                                                                                           \
        double inv = (double)invrms;                                                                            \
        return (T)(inv * inv * inv * sum_gx / (double)cols);                                                    \
    }                                                                                                           \
                                                                                                                \
    int fn_rms_norm_backward_##S(const T *dy, const T *x, const T *invrms, const T *weight, T *dx,              \
                                 T *dweight, ptrdiff_t rows, ptrdiff_t cols, int num_threads)                   \
    {                                                                                                           \
        const fn_ln_plan p = fn_ln_make_plan(rows, cols, num_threads);                                          \
        const ptrdiff_t part_values = p.chunks * cols;                                                          \
        const ptrdiff_t row_sums = p.segments > 1 ? rows * p.segments : 0;                                      \
        double *part = (double *)calloc(1, (size_t)(part_values + row_sums) * sizeof(double)                    \
                                               + (size_t)part_values * sizeof(T));                              \
        if (!part)                                                                                              \
            return -1;                                                                                          \
        double *sums = part + part_values;                                                                      \
        T *group = (T *)(sums + row_sums);                                                                      \
        const ptrdiff_t tiles = p.chunks * p.segments;                                                          \
        _Pragma("omp parallel num_threads(p.threads)")                                                          \
        {                                                                                                       \
            if (p.segments > 1) {                                                                               \
                _Pragma("omp for schedule(static)")                                                             \
                for (ptrdiff_t i = 0; i < rows * p.segments; i++) {                                             \
                    ptrdiff_t r = i / p.segments, c0 = (i % p.segments) * p.segment_cols;                       \
                    sums[i] = fn_rms_backward_sum_##S(dy + r * cols + c0, x + r * cols + c0,                    \
                                                      weight ? weight + c0 : NULL,                              \
                                                      fn_min(p.segment_cols, cols - c0), invrms[r]);            \
                }                                                                                               \
                _Pragma("omp for schedule(static)")                                                             \
                for (ptrdiff_t r = 0; r < rows; r++)                                                            \
                    for (ptrdiff_t g = 1; g < p.segments; g++)                                                  \
                        sums[r * p.segments] += sums[r * p.segments + g];                                       \
            }                                                                                                   \
            _Pragma("omp for schedule(static)")                                                                 \
            for (ptrdiff_t t = 0; t < tiles; t++) {                                                             \
                ptrdiff_t chunk = t / p.segments, c0 = (t % p.segments) * p.segment_cols;                       \
                ptrdiff_t n = fn_min(p.segment_cols, cols - c0);                                                \
                ptrdiff_t r1 = fn_min((chunk + 1) * p.chunk_rows, rows);                                        \
                const T *w = weight ? weight + c0 : NULL;                                                       \
                for (ptrdiff_t r = chunk * p.chunk_rows; r < r1; r++) {                                         \
                    double sum_gx = p.segments > 1 ? sums[r * p.segments]                                       \
                                                   : fn_rms_backward_sum_##S(dy + r * cols, x + r * cols, w,    \
                                                                             n, invrms[r]);                     \
                    fn_rms_backward_apply_##S(dy + r * cols + c0, x + r * cols + c0, w, dx + r * cols + c0,     \
                                              group + chunk * cols + c0, n, invrms[r],                          \
                                              fn_rms_backward_c_##S(invrms[r], sum_gx, cols));                  \
                    if ((r + 1 - chunk * p.chunk_rows) % FN_LN_ROW_GROUP == 0 || r + 1 == r1)                   \
                        fn_ln_flush_columns_##S(part + chunk * cols + c0, group + chunk * cols + c0, n);        \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        fn_ln_merge_chunks(part, p.chunks, cols, p.threads);                                                    \
        for (ptrdiff_t k = 0; k < cols; k++)                                                                    \
            dweight[k] = (T)part[k];                                                                            \
        free(part);                                                                                             \
        return 0;                                                                                               \
    }

FN_DEFINE_LAYER_NORM(float, f32)
FN_DEFINE_LAYER_NORM(double, f64)
