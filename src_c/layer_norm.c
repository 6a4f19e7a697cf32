/* Layer normalization and RMS normalization (see layer_norm.h): how a rows x cols problem is cut into work,
 * and the merge of the backward passes' column sums; the per-element loops and the entry points are
 * layer_norm_impl.h, instantiated once per element type.
 *
 * A row of up to LN_WIDE_COLS values is handled by one thread from start to end: its statistics, then the
 * pass that writes it, while it is still in cache.  Wider rows are cut into segments of LN_SEGMENT_COLS
 * values so that a few rows still keep every thread busy: segment statistics are computed in parallel,
 * merged per row in segment order, and the rows are written in a second parallel pass.  Which scheme a shape
 * gets depends on its width alone, never on the thread count.  Column sums (dweight, dbias) are per-chunk
 * float64 partial sums over fixed row chunks, merged in chunk order; the backward pass writes dx a few rows at
 * a time (LN_APPLY_ROWS), so that each column's float32 terms are read and written once per batch of rows.
 *
 * float32 rows are centred with the mean split into a float32 high part and the float32 rounding of the
 * remainder: x - hi is exact for values near the mean, so a row with mean 1e4 and std 1e-2 is normalized to
 * float32 precision rather than to the 1e-3 spacing of float32 numbers near 1e4.  Rows that leave float32's
 * range (denormal values with eps = 0, mixed signs near float32's maximum) are scaled by a power of two
 * first (fn_stats.h's fn_f32_range_scale).
 *
 * Statistics: fn_stats.h's fn_run_stats (per L1 block: float32 lanes for float32 rows when accurate, else an
 * exact float64 two-pass; Chan merges) and fn_sum_squares.  Backward reductions: fn_reductions.h's
 * fn_row_grad_sums and fn_row_grad_dot.
 *
 * The loops over a row are plain elementwise loops or single reductions into independent accumulators over
 * contiguous restrict pointers, which GCC and Clang vectorize at -O3 without -ffast-math; per-row constants
 * are hoisted, so no element needs a division or a square root.
 */
#include "layer_norm.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "fn_platform.h"
#include "fn_pool.h"
#include "fn_reductions.h"
#include "fn_stats.h"

/* Rows wider than this are cut into segments. */
#define LN_WIDE_COLS ((ptrdiff_t)1 << 16)
/* Values per segment of a wide row: a whole number of statistics blocks. */
#define LN_SEGMENT_COLS ((ptrdiff_t)16 * FN_STATS_BLOCK)
/* Values per row chunk of the backward passes: each chunk sums dweight/dbias into its own float64 row. */
#define LN_CHUNK_VALUES ((ptrdiff_t)1 << 18)
/* At most this many float64 values per partial-sum array (chunks * cols), whatever the row count. */
#define LN_PARTIAL_VALUES ((ptrdiff_t)1 << 21)
/* Rows whose dweight/dbias terms the backward passes add up in the element type before adding them to the
 * float64 partial sums. */
#define LN_ROW_GROUP 8
/* Rows whose dx the backward pass writes together, adding their dweight/dbias terms in registers: a divisor of
 * LN_ROW_GROUP.  Rows narrower than LN_APPLY_ROWS_MIN_COLS are written one by one: for them the batch was
 * slower where x and dy come from memory (benchmarks/README.md has the figures). */
#define LN_APPLY_ROWS 4
#define LN_APPLY_ROWS_MIN_COLS 2048
/* Tensors smaller than this run on one thread: waking others costs more than they save. */
#define LN_SERIAL_VALUES ((ptrdiff_t)1 << 15)
/* Columns per parallel task of the merge of the chunks' partial sums. */
#define LN_MERGE_COLS 2048
/* The low part of a row's centre is skipped when it is below this fraction of the row's standard deviation:
 * it then moves the normalized values by less than float32's resolution of their spread. */
#define LN_NEGLIGIBLE_LO 0x1p-30

/* How a rows x cols problem is cut up; a function of the shape only (plus the thread count, which decides
 * nothing but how many threads share the fixed pieces). */
typedef struct {
    ptrdiff_t rows, cols;
    ptrdiff_t segment_cols, segments; /* column segments per row: 1 for rows up to LN_WIDE_COLS */
    ptrdiff_t chunk_rows, chunks;     /* row chunks of the backward column sums */
    int threads;
} ln_plan;

static ln_plan ln_make_plan(ptrdiff_t rows, ptrdiff_t cols, int num_threads)
{
    ln_plan p;
    p.rows = rows;
    p.cols = cols;
    p.segment_cols = cols > LN_WIDE_COLS ? LN_SEGMENT_COLS : cols;
    p.segments = fn_ceil_div(cols, p.segment_cols);
    ptrdiff_t max_chunks = fn_max(LN_PARTIAL_VALUES / cols, 1);
    ptrdiff_t chunk_rows = fn_max(fn_ceil_div(LN_CHUNK_VALUES, cols), fn_ceil_div(rows, max_chunks));
    p.chunk_rows = fn_min(chunk_rows, rows);
    p.chunks = fn_ceil_div(rows, p.chunk_rows);
    p.threads = rows * cols < LN_SERIAL_VALUES || num_threads < 1 ? 1 : num_threads;
    return p;
}

/* The columns [c0, c0 + n) of segment `segment` of a row. */
static ptrdiff_t ln_segment_start(const ln_plan *p, ptrdiff_t segment) { return segment * p->segment_cols; }

static ptrdiff_t ln_segment_len(const ln_plan *p, ptrdiff_t c0) { return fn_min(p->segment_cols, p->cols - c0); }

/* part holds `chunks` rows of `cols` partial sums; out[0..cols) receives their sums, added in chunk order for
 * every column (part's first row is overwritten). */
typedef struct {
    double *part, *out;
    ptrdiff_t chunks, cols;
} ln_merge_job;

static void ln_merge_chunks_region(fn_worker *w, void *arg)
{
    const ln_merge_job *j = arg;
    double *part = j->part;
    const ptrdiff_t cols = j->cols;
    FN_FOR(w, b, fn_ceil_div(cols, LN_MERGE_COLS), LN_MERGE_COLS * j->chunks)
    {
        ptrdiff_t k0 = b * LN_MERGE_COLS, k1 = fn_min(k0 + LN_MERGE_COLS, cols);
        for (ptrdiff_t c = 1; c < j->chunks; c++) {
            const double *src = part + c * cols;
            for (ptrdiff_t k = k0; k < k1; k++)
                part[k] += src[k];
        }
        for (ptrdiff_t k = k0; k < k1; k++)
            j->out[k] = part[k];
    }
}

static void ln_merge_chunks(double *part, ptrdiff_t chunks, ptrdiff_t cols, double *out, int threads)
{
    ln_merge_job j = {part, out, chunks, cols};
    fn_team_run(fn_team_size(chunks * cols, threads), ln_merge_chunks_region, &j);
}

/* A row's inverse standard deviation, from its statistics. */
static double ln_invstd(fn_stats s, double eps) { return 1.0 / sqrt(fn_stats_var(s) + eps); }

/* A row's inverse root mean square, from its sum of squares. */
static double rms_invrms(double sum_squares, ptrdiff_t cols, double eps)
{
    return 1.0 / sqrt(sum_squares / (double)cols + eps);
}

/* The factor of x in RMS norm's dx = invrms * g - c * x: c = invrms^3 * mean(g * x). */
static double rms_backward_c(double invrms, double sum_gx, ptrdiff_t cols)
{
    return invrms * invrms * invrms * sum_gx / (double)cols;
}

/* The per-element loops and the entry points, for float and double. */
#define FN_IMPL "layer_norm_impl.h"
#include "fn_instantiate.h"

/* The residual variants (add_layer_norm, add_rms_norm), built on them. */
#define FN_IMPL "add_norm_impl.h"
#include "fn_instantiate.h"
