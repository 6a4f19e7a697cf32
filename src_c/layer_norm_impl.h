/* Layer and RMS normalization's per-element loops and entry points for one element type (see
 * fn_instantiate.h): instantiated by layer_norm.c, whose plan (ln_plan) and merge they use. */
#ifndef FN_T
#error "layer_norm_impl.h is instantiated by layer_norm.c"
#endif

/* weight and bias as FN_T arrays for the element loops (NULL stays NULL): for double the arrays given, for
 * float their roundings in *scratch, which the caller frees.  Each starts on a cache line, as NumPy's arrays
 * do: the element loops read them beside x, and a vector load that splits a cache line is slower. */
static fn_status FN_NAME(ln_params)(const double *weight, const double *bias, ptrdiff_t cols, const FN_T **w,
                                    const FN_T **b, void **scratch)
{
    *scratch = NULL;
#if FN_IS_F32
    *w = NULL;
    *b = NULL;
    if (weight == NULL && bias == NULL)
        return FN_OK;
    const ptrdiff_t per_line = FN_CACHE_LINE / (ptrdiff_t)sizeof(float);
    const ptrdiff_t stride = fn_ceil_div(cols, per_line) * per_line;
    void *raw = malloc(2 * (size_t)stride * sizeof(float) + FN_CACHE_LINE);
    if (raw == NULL)
        return FN_NOMEM;
    *scratch = raw;
    float *p = fn_cache_line_align(raw);
    if (weight) {
        for (ptrdiff_t k = 0; k < cols; k++)
            p[k] = (float)weight[k];
        *w = p;
    }
    if (bias) {
        for (ptrdiff_t k = 0; k < cols; k++)
            p[stride + k] = (float)bias[k];
        *b = p + stride;
    }
#else
    (void)cols;
    *w = weight;
    *b = bias;
#endif
    return FN_OK;
}

/* ---- Layer norm forward ---- */

/* A row's centre as hi + lo in FN_T and its inverse standard deviation in FN_T, for y = ((x * scale - hi) - lo)
 * * invstd: scale is 1 unless the row leaves float32's range (fn_f32_range_scale), and then hi, lo and invstd
 * are of the scaled row.  lo is 0 where it is negligible against the row's spread. */
typedef struct {
    FN_T scale, hi, lo, invstd;
} FN_NAME(ln_row);

FN_INLINE FN_NAME(ln_row) FN_NAME(ln_row_of)(fn_stats st, double invstd)
{
    FN_NAME(ln_row) row;
#if FN_IS_F32
    const double scale = fn_f32_range_scale(st.mean, invstd);
#else
    const double scale = 1.0;
#endif
    const double centre = st.mean * scale;
    row.scale = (FN_T)scale;
    row.hi = (FN_T)centre;
    const double lo = centre - (double)row.hi;
    row.lo = lo * lo < LN_NEGLIGIBLE_LO * LN_NEGLIGIBLE_LO * fn_stats_var(st) * (scale * scale) ? 0 : (FN_T)lo;
    row.invstd = (FN_T)(scale == 1.0 ? invstd : invstd / scale);
    return row;
}

FN_INLINE void FN_NAME(ln_apply_centred)(const FN_T *restrict x, const FN_T *restrict w, const FN_T *restrict b,
                                         FN_T *restrict y, ptrdiff_t n, FN_T hi, FN_T inv)
{
    if (w && b)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = (x[i] - hi) * inv * w[i] + b[i];
    else if (w)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = (x[i] - hi) * inv * w[i];
    else if (b)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = (x[i] - hi) * inv + b[i];
    else
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = (x[i] - hi) * inv;
}

#if FN_IS_F32
/* The rows that leave float32's range: rare, so one loop serves every combination of weight and bias, and
 * writes y with ordinary stores. */
FN_COLD void FN_NAME(ln_apply_scaled)(const FN_T *restrict x, const FN_T *restrict w, const FN_T *restrict b,
                                      FN_T *restrict y, ptrdiff_t n, FN_NAME(ln_row) row)
{
    const FN_T scale = row.scale, hi = row.hi, lo = row.lo, inv = row.invstd;
    for (ptrdiff_t i = 0; i < n; i++) {
        FN_T v = ((x[i] * scale - hi) - lo) * inv;
        y[i] = (w ? v * w[i] : v) + (b ? b[i] : 0);
    }
}
#endif

FN_INLINE void FN_NAME(ln_apply)(const FN_T *restrict x, const FN_T *restrict w, const FN_T *restrict b,
                                 FN_T *restrict y, ptrdiff_t n, FN_NAME(ln_row) row)
{
    const FN_T hi = row.hi, lo = row.lo, inv = row.invstd;
    if (lo == 0) {
        FN_NAME(ln_apply_centred)(x, w, b, y, n, hi, inv);
        return;
    }
    if (w && b)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = ((x[i] - hi) - lo) * inv * w[i] + b[i];
    else if (w)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = ((x[i] - hi) - lo) * inv * w[i];
    else if (b)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = ((x[i] - hi) - lo) * inv + b[i];
    else
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = ((x[i] - hi) - lo) * inv;
}

/* y = the applied row, written with ordinary stores, or computed piece by piece into L1 and streamed to
 * memory when the whole output is large (stream). */
FN_INLINE void FN_NAME(ln_write)(const FN_T *x, const FN_T *w, const FN_T *b, FN_T *y, ptrdiff_t n,
                                 FN_NAME(ln_row) row, int stream)
{
#if FN_IS_F32
    if (row.scale != 1) {
        FN_NAME(ln_apply_scaled)(x, w, b, y, n, row);
        return;
    }
#endif
    if (!stream) {
        FN_NAME(ln_apply)(x, w, b, y, n, row);
        return;
    }
    FN_T piece[FN_STATS_BLOCK];
    for (ptrdiff_t start = 0; start < n; start += FN_STATS_BLOCK) {
        const ptrdiff_t len = fn_min(FN_STATS_BLOCK, n - start);
        FN_NAME(ln_apply)(x + start, w ? w + start : NULL, b ? b + start : NULL, piece, len, row);
        FN_NAME(fn_stream_store)(y + start, piece, len);
    }
}

/* The dispatch points: one call per row, or per segment of a wide row, runs the vector target's code with
 * the statistics and the apply loop inlined. */
FN_VECTOR_KERNEL static void FN_NAME(ln_normalize_row)(const FN_T *x, FN_T *y, ptrdiff_t cols, const FN_T *w,
                                                       const FN_T *b, double eps, double *mean, double *invstd,
                                                       int stream)
{
    fn_stats s = FN_NAME(fn_run_stats)(x, cols);
    *mean = s.mean;
    *invstd = ln_invstd(s, eps);
    FN_NAME(ln_write)(x, w, b, y, cols, FN_NAME(ln_row_of)(s, *invstd), stream);
}

FN_VECTOR_KERNEL static fn_stats FN_NAME(ln_segment_stats)(const FN_T *x, ptrdiff_t n)
{
    return FN_NAME(fn_run_stats)(x, n);
}

FN_VECTOR_KERNEL static void FN_NAME(ln_segment_apply)(const FN_T *x, FN_T *y, ptrdiff_t n, const FN_T *w,
                                                       const FN_T *b, FN_NAME(ln_row) row, int stream)
{
    FN_NAME(ln_write)(x, w, b, y, n, row, stream);
}

/* What the parallel regions of this file read and write. */
typedef struct {
    const ln_plan *p;
    const FN_T *x, *dy;
    FN_T *y; /* y, or dx */
    const FN_T *w, *b;
    double eps;
    double *mean_out, *invstd_out; /* written by the forward passes (RMS norm: invrms as invstd) */
    const double *mean, *invstd;   /* read by the backward passes */
    fn_stats *stats;
    double *sums, *part;
    FN_T *group;
    int stream;
    const FN_T *ds;       /* the residual variants' backward: the gradient arriving on s, added to dx */
    const FN_T *residual; /* their forward: s = x + residual, written to s */
    FN_T *s;
    atomic_int failed;
} FN_NAME(ln_job);

/* Wide rows, once every segment's statistics are in j->stats: the rows' statistics merged in segment order,
 * then y written from src (x, or the residual variant's s). */
static void FN_NAME(ln_segments_finish)(fn_worker *w, const FN_NAME(ln_job) *j, const FN_T *src)
{
    const ln_plan *p = j->p;
    const ptrdiff_t rows = p->rows, cols = p->cols, items = rows * p->segments;
    FN_FOR(w, r, rows, p->segments)
    {
        fn_stats *row_stats = j->stats + r * p->segments;
        for (ptrdiff_t g = 1; g < p->segments; g++)
            fn_stats_merge(&row_stats[0], row_stats[g]);
        j->mean_out[r] = row_stats[0].mean;
        j->invstd_out[r] = ln_invstd(row_stats[0], j->eps);
    }
    FN_FOR(w, i, items, p->segment_cols)
    {
        ptrdiff_t r = i / p->segments, c0 = ln_segment_start(p, i % p->segments);
        FN_NAME(ln_segment_apply)(src + r * cols + c0, j->y + r * cols + c0, ln_segment_len(p, c0),
                                  j->w ? j->w + c0 : NULL, j->b ? j->b + c0 : NULL,
                                  FN_NAME(ln_row_of)(j->stats[r * p->segments], j->invstd_out[r]), j->stream);
    }
}

static void FN_NAME(ln_forward_region)(fn_worker *w, void *arg)
{
    const FN_NAME(ln_job) *j = arg;
    const ln_plan *p = j->p;
    const ptrdiff_t rows = p->rows, cols = p->cols;
    const FN_T *x = j->x;
    FN_T *y = j->y;
    if (p->segments == 1) {
        FN_FOR(w, r, rows, 2 * cols)
        FN_NAME(ln_normalize_row)(x + r * cols, y + r * cols, cols, j->w, j->b, j->eps, &j->mean_out[r], &j->invstd_out[r],
                                  j->stream);
        return;
    }
    const ptrdiff_t items = rows * p->segments;
    FN_FOR(w, i, items, p->segment_cols)
    {
        ptrdiff_t r = i / p->segments, c0 = ln_segment_start(p, i % p->segments);
        j->stats[i] = FN_NAME(ln_segment_stats)(x + r * cols + c0, ln_segment_len(p, c0));
    }
    FN_NAME(ln_segments_finish)(w, j, x);
}

fn_status FN_NAME(fn_layer_norm)(const FN_T *x, FN_T *y, ptrdiff_t rows, ptrdiff_t cols, const double *weight,
                                 const double *bias, double eps, double *mean, double *invstd, int num_threads)
{
    const ln_plan p = ln_make_plan(rows, cols, num_threads);
    FN_NAME(ln_job) j = {&p, x, NULL, y, NULL, NULL, eps, mean, invstd, NULL, NULL, NULL, NULL, NULL, NULL, 0,
                         NULL, NULL, NULL, 0};
    j.stream = fn_streams(rows * cols, sizeof(FN_T));
    void *params;
    if (FN_NAME(ln_params)(weight, bias, cols, &j.w, &j.b, &params) != FN_OK)
        return FN_NOMEM;
    if (p.segments > 1) {
        j.stats = malloc((size_t)(rows * p.segments) * sizeof(fn_stats));
        if (j.stats == NULL) {
            free(params);
            return FN_NOMEM;
        }
    }
    fn_team_run(p.threads, FN_NAME(ln_forward_region), &j);
    free(j.stats);
    free(params);
    return FN_OK;
}

/* ---- Layer norm backward ---- */

/* part += rows in float64, then rows = 0: the backward passes sum dweight/dbias over LN_ROW_GROUP rows in
 * FN_T, then into the chunk's float64 partial sums. */
FN_VECTOR_KERNEL static void FN_NAME(ln_flush_columns)(double *restrict part, FN_T *restrict rows, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        part[i] += (double)rows[i];
        rows[i] = 0;
    }
}

FN_VECTOR_KERNEL static void FN_NAME(ln_row_grad_sums)(const FN_T *dy, const FN_T *x, const FN_T *w, ptrdiff_t n,
                                                       FN_T centre, double invstd, double sums[3])
{
    FN_NAME(fn_row_grad_sums)(dy, x, w, n, centre, invstd, sums);
}

/* dx = invstd * (g - mean(g) - xhat * mean(g * xhat)) = a * g + c * xhat + b, with xhat centred on the row's
 * exact mean: hi, the given mean in FN_T, plus lo, the residual mean sum(d) / cols.  A row that leaves
 * float32's range computes xhat as ((x * scale - hi) - lo) * invstd, of the scaled row (as ln_row). */
typedef struct {
    FN_T scale, hi, lo, invstd, a, b, c;
} FN_NAME(ln_grad_row);

static FN_NAME(ln_grad_row) FN_NAME(ln_grad_constants)(double mean, double invstd, const double sums[3],
                                                       ptrdiff_t cols)
{
    FN_NAME(ln_grad_row) row;
    double residual = sums[2] / (double)cols;
    double mean_g = sums[0] / (double)cols;
    double mean_gxhat = (sums[1] - residual * sums[0]) * invstd / (double)cols;
#if FN_IS_F32
    const double scale = fn_f32_range_scale(mean, invstd);
#else
    const double scale = 1.0;
#endif
    row.scale = (FN_T)scale;
    row.hi = (FN_T)((double)(FN_T)mean * scale);
    row.lo = (FN_T)(residual * scale);
    row.invstd = (FN_T)(invstd / scale);
    row.a = (FN_T)invstd;
    row.b = (FN_T)(-invstd * mean_g);
    row.c = (FN_T)(-invstd * mean_gxhat);
    return row;
}

/* dx += ds over a run of dx just written (the residual variants), while it is in cache. */
FN_INLINE void FN_NAME(ln_add_residual_grad)(FN_T *restrict dx, const FN_T *restrict ds, ptrdiff_t n)
{
    if (ds)
        for (ptrdiff_t i = 0; i < n; i++)
            dx[i] += ds[i];
}

FN_VECTOR_KERNEL static void FN_NAME(ln_backward_apply)(const FN_T *restrict dy, const FN_T *restrict x,
                                                        FN_T *restrict dx, ptrdiff_t n, const FN_T *restrict w,
                                                        FN_NAME(ln_grad_row) row, FN_T *restrict dweight_rows,
                                                        FN_T *restrict dbias_rows, const FN_T *restrict ds)
{
    const FN_T hi = row.hi, lo = row.lo, inv = row.invstd, a = row.a, b = row.b, c = row.c;
#if FN_IS_F32
    if (row.scale != 1) {
        const FN_T scale = row.scale;
        for (ptrdiff_t i = 0; i < n; i++) {
            FN_T xhat = ((x[i] * scale - hi) - lo) * inv;
            dx[i] = a * (w ? dy[i] * w[i] : dy[i]) + c * xhat + b;
            dweight_rows[i] += dy[i] * xhat;
            dbias_rows[i] += dy[i];
        }
        FN_NAME(ln_add_residual_grad)(dx, ds, n);
        return;
    }
#endif
    if (w)
        for (ptrdiff_t i = 0; i < n; i++) {
            FN_T xhat = ((x[i] - hi) - lo) * inv;
            dx[i] = a * (dy[i] * w[i]) + c * xhat + b;
            dweight_rows[i] += dy[i] * xhat;
            dbias_rows[i] += dy[i];
        }
    else
        for (ptrdiff_t i = 0; i < n; i++) {
            FN_T xhat = ((x[i] - hi) - lo) * inv;
            dx[i] = a * dy[i] + c * xhat + b;
            dweight_rows[i] += dy[i] * xhat;
            dbias_rows[i] += dy[i];
        }
    FN_NAME(ln_add_residual_grad)(dx, ds, n);
}

/* LN_APPLY_ROWS consecutive rows (stride values apart) of ln_backward_apply at once, none of them scaled: each
 * column's dweight and dbias terms are read and written once for the rows rather than once
 * per row, and added in row order, as row by row. */
FN_VECTOR_KERNEL static void FN_NAME(ln_backward_apply_rows)(const FN_T *restrict dy, const FN_T *restrict x,
                                                             FN_T *restrict dx, ptrdiff_t stride, ptrdiff_t n,
                                                             const FN_T *restrict w,
                                                             const FN_NAME(ln_grad_row) *rows,
                                                             FN_T *restrict dweight_rows,
                                                             FN_T *restrict dbias_rows, const FN_T *ds)
{
    FN_T hi[LN_APPLY_ROWS], lo[LN_APPLY_ROWS], inv[LN_APPLY_ROWS], a[LN_APPLY_ROWS], b[LN_APPLY_ROWS],
        c[LN_APPLY_ROWS];
    for (int r = 0; r < LN_APPLY_ROWS; r++) {
        hi[r] = rows[r].hi;
        lo[r] = rows[r].lo;
        inv[r] = rows[r].invstd;
        a[r] = rows[r].a;
        b[r] = rows[r].b;
        c[r] = rows[r].c;
    }
    if (w)
        for (ptrdiff_t i = 0; i < n; i++) {
            FN_T dweight = dweight_rows[i], dbias = dbias_rows[i];
            for (int r = 0; r < LN_APPLY_ROWS; r++) {
                const FN_T g = dy[r * stride + i];
                FN_T xhat = ((x[r * stride + i] - hi[r]) - lo[r]) * inv[r];
                dx[r * stride + i] = a[r] * (g * w[i]) + c[r] * xhat + b[r];
                dweight += g * xhat;
                dbias += g;
            }
            dweight_rows[i] = dweight;
            dbias_rows[i] = dbias;
        }
    else
        for (ptrdiff_t i = 0; i < n; i++) {
            FN_T dweight = dweight_rows[i], dbias = dbias_rows[i];
            for (int r = 0; r < LN_APPLY_ROWS; r++) {
                const FN_T g = dy[r * stride + i];
                FN_T xhat = ((x[r * stride + i] - hi[r]) - lo[r]) * inv[r];
                dx[r * stride + i] = a[r] * g + c[r] * xhat + b[r];
                dweight += g * xhat;
                dbias += g;
            }
            dweight_rows[i] = dweight;
            dbias_rows[i] = dbias;
        }
    if (ds)
        for (int r = 0; r < LN_APPLY_ROWS; r++)
            FN_NAME(ln_add_residual_grad)(dx + r * stride, ds + r * stride, n);
}

/* Row r's dx constants: from its sums of wide rows' segments (already in j->sums), else summed here. */
static FN_NAME(ln_grad_row) FN_NAME(ln_backward_row)(const FN_NAME(ln_job) *j, ptrdiff_t r, const FN_T *w)
{
    const ln_plan *p = j->p;
    const ptrdiff_t cols = p->cols;
    double row_sums_here[3] = {0.0, 0.0, 0.0};
    const double *s = row_sums_here;
    if (p->segments > 1)
        s = j->sums + 3 * r * p->segments;
    else
        FN_NAME(ln_row_grad_sums)(j->dy + r * cols, j->x + r * cols, w, cols, (FN_T)j->mean[r], j->invstd[r],
                                  row_sums_here);
    return FN_NAME(ln_grad_constants)(j->mean[r], j->invstd[r], s, cols);
}

static void FN_NAME(ln_backward_region)(fn_worker *wk, void *arg)
{
    const FN_NAME(ln_job) *j = arg;
    const ln_plan *p = j->p;
    const ptrdiff_t rows = p->rows, cols = p->cols, part_values = p->chunks * cols;
    const FN_T *dy = j->dy, *x = j->x, *weights = j->w;
    const double *mean = j->mean, *invstd = j->invstd;
    double *sums = j->sums, *part = j->part;
    FN_T *group = j->group;
    if (p->segments > 1) {
        FN_FOR(wk, i, rows * p->segments, 2 * p->segment_cols)
        {
            ptrdiff_t r = i / p->segments, c0 = ln_segment_start(p, i % p->segments);
            FN_NAME(ln_row_grad_sums)(dy + r * cols + c0, x + r * cols + c0, weights ? weights + c0 : NULL,
                                      ln_segment_len(p, c0), (FN_T)mean[r], invstd[r], sums + 3 * i);
        }
        FN_FOR(wk, r, rows, 3 * p->segments)
        for (ptrdiff_t g = 1; g < p->segments; g++)
            for (int k = 0; k < 3; k++)
                sums[3 * r * p->segments + k] += sums[3 * (r * p->segments + g) + k];
    }
    FN_FOR(wk, t, p->chunks * p->segments, 3 * p->chunk_rows * p->segment_cols)
    {
        ptrdiff_t chunk = t / p->segments, c0 = ln_segment_start(p, t % p->segments);
        ptrdiff_t n = ln_segment_len(p, c0);
        ptrdiff_t r1 = fn_min((chunk + 1) * p->chunk_rows, rows);
        const FN_T *w = weights ? weights + c0 : NULL;
        double *dweight_part = part + chunk * cols + c0;
        double *dbias_part = part + part_values + chunk * cols + c0;
        FN_T *dweight_rows = group + chunk * cols + c0;
        FN_T *dbias_rows = group + part_values + chunk * cols + c0;
        if (n < LN_APPLY_ROWS_MIN_COLS) {
            for (ptrdiff_t r = chunk * p->chunk_rows; r < r1; r++) {
                FN_NAME(ln_backward_apply)(dy + r * cols + c0, x + r * cols + c0, j->y + r * cols + c0, n, w,
                                           FN_NAME(ln_backward_row)(j, r, w), dweight_rows, dbias_rows,
                                           j->ds ? j->ds + r * cols + c0 : NULL);
                if ((r + 1 - chunk * p->chunk_rows) % LN_ROW_GROUP == 0 || r + 1 == r1) {
                    FN_NAME(ln_flush_columns)(dweight_part, dweight_rows, n);
                    FN_NAME(ln_flush_columns)(dbias_part, dbias_rows, n);
                }
            }
            continue;
        }
        for (ptrdiff_t r0 = chunk * p->chunk_rows; r0 < r1;) {
            /* Wide rows: a batch of LN_APPLY_ROWS rows, or fewer up to the next flush of the column sums; a
             * whole batch of plain rows is applied together. */
            const ptrdiff_t done = r0 - chunk * p->chunk_rows;
            const ptrdiff_t batch = fn_min(fn_min(LN_APPLY_ROWS, LN_ROW_GROUP - done % LN_ROW_GROUP), r1 - r0);
            FN_NAME(ln_grad_row) rows_here[LN_APPLY_ROWS];
            int plain = batch == LN_APPLY_ROWS;
            for (ptrdiff_t k = 0; k < batch; k++) {
                rows_here[k] = FN_NAME(ln_backward_row)(j, r0 + k, w);
                plain = plain && rows_here[k].scale == 1;
            }
            if (plain)
                FN_NAME(ln_backward_apply_rows)(dy + r0 * cols + c0, x + r0 * cols + c0, j->y + r0 * cols + c0, cols,
                                                n, w, rows_here, dweight_rows, dbias_rows,
                                                j->ds ? j->ds + r0 * cols + c0 : NULL);
            else
                for (ptrdiff_t k = 0; k < batch; k++) {
                    const ptrdiff_t r = r0 + k;
                    FN_NAME(ln_backward_apply)(dy + r * cols + c0, x + r * cols + c0, j->y + r * cols + c0, n, w,
                                               rows_here[k], dweight_rows, dbias_rows,
                                               j->ds ? j->ds + r * cols + c0 : NULL);
                }
            r0 += batch;
            if ((r0 - chunk * p->chunk_rows) % LN_ROW_GROUP == 0 || r0 == r1) {
                FN_NAME(ln_flush_columns)(dweight_part, dweight_rows, n);
                FN_NAME(ln_flush_columns)(dbias_part, dbias_rows, n);
            }
        }
    }
}

/* layer_norm_backward, and with ds (not NULL) add_layer_norm_backward. */
static fn_status FN_NAME(ln_backward)(const FN_T *dy, const FN_T *ds, const FN_T *x, FN_T *dx, ptrdiff_t rows,
                                      ptrdiff_t cols, const double *mean, const double *invstd,
                                      const double *weight, double *dweight, double *dbias, int num_threads)
{
    const ln_plan p = ln_make_plan(rows, cols, num_threads);
    const ptrdiff_t part_values = p.chunks * cols;
    const ptrdiff_t row_sums = p.segments > 1 ? 3 * rows * p.segments : 0;
    const FN_T *weights, *unused_bias;
    void *params;
    if (FN_NAME(ln_params)(weight, NULL, cols, &weights, &unused_bias, &params) != FN_OK)
        return FN_NOMEM;
    /* dweight and dbias partial sums (float64), the rows' reduction sums of wide rows, then the row groups'
     * dweight and dbias terms (FN_T), all zeroed. */
    double *part = calloc(1, (size_t)(2 * part_values + row_sums) * sizeof(double)
                          + (size_t)(2 * part_values) * sizeof(FN_T));
    if (part == NULL) {
        free(params);
        return FN_NOMEM;
    }
    double *sums = part + 2 * part_values;
    FN_T *group = (FN_T *)(sums + row_sums);
    FN_NAME(ln_job) j = {&p, x, dy, dx, weights, NULL, 0.0, NULL, NULL, mean, invstd, NULL, sums, part, group, 0,
                         ds, NULL, NULL, 0};
    fn_team_run(p.threads, FN_NAME(ln_backward_region), &j);
    ln_merge_chunks(part, p.chunks, cols, dweight, p.threads);
    ln_merge_chunks(part + part_values, p.chunks, cols, dbias, p.threads);
    free(part);
    free(params);
    return FN_OK;
}

fn_status FN_NAME(fn_layer_norm_backward)(const FN_T *dy, const FN_T *x, FN_T *dx, ptrdiff_t rows, ptrdiff_t cols,
                                          const double *mean, const double *invstd, const double *weight,
                                          double *dweight, double *dbias, int num_threads)
{
    return FN_NAME(ln_backward)(dy, NULL, x, dx, rows, cols, mean, invstd, weight, dweight, dbias, num_threads);
}

/* ---- RMS norm forward ---- */

/* A row's inverse root mean square in FN_T, for y = (x * scale) * invrms: scale is 1 unless the row leaves
 * float32's range (fn_f32_range_scale), and then invrms is of the scaled row. */
typedef struct {
    FN_T scale, invrms;
} FN_NAME(rms_row);

FN_INLINE FN_NAME(rms_row) FN_NAME(rms_row_of)(double invrms)
{
    FN_NAME(rms_row) row;
#if FN_IS_F32
    const double scale = fn_f32_range_scale(0.0, invrms);
#else
    const double scale = 1.0;
#endif
    row.scale = (FN_T)scale;
    row.invrms = (FN_T)(scale == 1.0 ? invrms : invrms / scale);
    return row;
}

#if FN_IS_F32
/* The rows that leave float32's range, as ln_apply_scaled. */
FN_COLD void FN_NAME(rms_apply_scaled)(const FN_T *restrict x, const FN_T *restrict w, FN_T *restrict y,
                                       ptrdiff_t n, FN_NAME(rms_row) row)
{
    const FN_T scale = row.scale, invrms = row.invrms;
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = w ? (x[i] * scale) * invrms * w[i] : (x[i] * scale) * invrms;
}
#endif

FN_INLINE void FN_NAME(rms_apply)(const FN_T *restrict x, const FN_T *restrict w, FN_T *restrict y, ptrdiff_t n,
                                  FN_NAME(rms_row) row)
{
    const FN_T invrms = row.invrms;
    if (w)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = x[i] * invrms * w[i];
    else
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = x[i] * invrms;
}

/* As ln_write: ordinary stores, or L1 pieces streamed to memory. */
FN_INLINE void FN_NAME(rms_write)(const FN_T *x, const FN_T *w, FN_T *y, ptrdiff_t n, FN_NAME(rms_row) row,
                                  int stream)
{
#if FN_IS_F32
    if (row.scale != 1) {
        FN_NAME(rms_apply_scaled)(x, w, y, n, row);
        return;
    }
#endif
    if (!stream) {
        FN_NAME(rms_apply)(x, w, y, n, row);
        return;
    }
    FN_T piece[FN_STATS_BLOCK];
    for (ptrdiff_t start = 0; start < n; start += FN_STATS_BLOCK) {
        const ptrdiff_t len = fn_min(FN_STATS_BLOCK, n - start);
        FN_NAME(rms_apply)(x + start, w ? w + start : NULL, piece, len, row);
        FN_NAME(fn_stream_store)(y + start, piece, len);
    }
}

FN_VECTOR_KERNEL static double FN_NAME(rms_normalize_row)(const FN_T *x, FN_T *y, ptrdiff_t cols, const FN_T *w,
                                                          double eps, int stream)
{
    double invrms = rms_invrms(FN_NAME(fn_sum_squares)(x, cols), cols, eps);
    FN_NAME(rms_write)(x, w, y, cols, FN_NAME(rms_row_of)(invrms), stream);
    return invrms;
}

FN_VECTOR_KERNEL static double FN_NAME(rms_segment_sum_squares)(const FN_T *x, ptrdiff_t n)
{
    return FN_NAME(fn_sum_squares)(x, n);
}

FN_VECTOR_KERNEL static void FN_NAME(rms_segment_apply)(const FN_T *x, FN_T *y, ptrdiff_t n, const FN_T *w,
                                                        FN_NAME(rms_row) row, int stream)
{
    FN_NAME(rms_write)(x, w, y, n, row, stream);
}

/* As ln_segments_finish, for RMS norm's segment sums of squares in j->sums. */
static void FN_NAME(rms_segments_finish)(fn_worker *w, const FN_NAME(ln_job) *j, const FN_T *src)
{
    const ln_plan *p = j->p;
    const ptrdiff_t rows = p->rows, cols = p->cols, items = rows * p->segments;
    double *invrms = j->invstd_out, *sums = j->sums;
    FN_FOR(w, r, rows, p->segments)
    {
        for (ptrdiff_t g = 1; g < p->segments; g++)
            sums[r * p->segments] += sums[r * p->segments + g];
        invrms[r] = rms_invrms(sums[r * p->segments], cols, j->eps);
    }
    FN_FOR(w, i, items, p->segment_cols)
    {
        ptrdiff_t r = i / p->segments, c0 = ln_segment_start(p, i % p->segments);
        FN_NAME(rms_segment_apply)(src + r * cols + c0, j->y + r * cols + c0, ln_segment_len(p, c0),
                                   j->w ? j->w + c0 : NULL, FN_NAME(rms_row_of)(invrms[r]), j->stream);
    }
}

static void FN_NAME(rms_forward_region)(fn_worker *w, void *arg)
{
    const FN_NAME(ln_job) *j = arg;
    const ln_plan *p = j->p;
    const ptrdiff_t rows = p->rows, cols = p->cols;
    const FN_T *x = j->x;
    FN_T *y = j->y;
    double *invrms = j->invstd_out, *sums = j->sums;
    if (p->segments == 1) {
        FN_FOR(w, r, rows, 2 * cols)
        invrms[r] = FN_NAME(rms_normalize_row)(x + r * cols, y + r * cols, cols, j->w, j->eps, j->stream);
        return;
    }
    const ptrdiff_t items = rows * p->segments;
    FN_FOR(w, i, items, p->segment_cols)
    {
        ptrdiff_t r = i / p->segments, c0 = ln_segment_start(p, i % p->segments);
        sums[i] = FN_NAME(rms_segment_sum_squares)(x + r * cols + c0, ln_segment_len(p, c0));
    }
    FN_NAME(rms_segments_finish)(w, j, x);
}

fn_status FN_NAME(fn_rms_norm)(const FN_T *x, FN_T *y, ptrdiff_t rows, ptrdiff_t cols, const double *weight,
                               double eps, double *invrms, int num_threads)
{
    const ln_plan p = ln_make_plan(rows, cols, num_threads);
    FN_NAME(ln_job) j = {&p, x, NULL, y, NULL, NULL, eps, NULL, invrms, NULL, NULL, NULL, NULL, NULL, NULL, 0,
                         NULL, NULL, NULL, 0};
    j.stream = fn_streams(rows * cols, sizeof(FN_T));
    const FN_T *unused_bias;
    void *params;
    if (FN_NAME(ln_params)(weight, NULL, cols, &j.w, &unused_bias, &params) != FN_OK)
        return FN_NOMEM;
    if (p.segments > 1) {
        j.sums = malloc((size_t)(rows * p.segments) * sizeof(double));
        if (j.sums == NULL) {
            free(params);
            return FN_NOMEM;
        }
    }
    fn_team_run(p.threads, FN_NAME(rms_forward_region), &j);
    free(j.sums);
    free(params);
    return FN_OK;
}

/* ---- RMS norm backward ---- */

FN_VECTOR_KERNEL static double FN_NAME(rms_row_grad_dot)(const FN_T *dy, const FN_T *x, const FN_T *w, ptrdiff_t n,
                                                         double invrms)
{
    return FN_NAME(fn_row_grad_dot)(dy, x, w, n, invrms);
}

/* dx = invrms * g - c * x with c = invrms^3 * mean(g * x); dweight += dy * x * invrms.  A row whose invrms
 * leaves float32's range (fn_f32_range_scale), where c would underflow (|x| beyond about 1e19), is written
 * with xhat = x * invrms, which is near unit size: dx = invrms * g - k * xhat with k = invrms^2 * mean(g * x)
 * passed as c. */
FN_VECTOR_KERNEL static void FN_NAME(rms_backward_apply)(const FN_T *restrict dy, const FN_T *restrict x,
                                                         FN_T *restrict dx, ptrdiff_t n, const FN_T *restrict w,
                                                         FN_T invrms, FN_T c, int by_xhat,
                                                         FN_T *restrict dweight_rows, const FN_T *restrict ds)
{
#if FN_IS_F32
    if (by_xhat) {
        for (ptrdiff_t i = 0; i < n; i++) {
            const FN_T xhat = x[i] * invrms;
            dx[i] = invrms * (w ? dy[i] * w[i] : dy[i]) - c * xhat;
            dweight_rows[i] += dy[i] * xhat;
        }
        FN_NAME(ln_add_residual_grad)(dx, ds, n);
        return;
    }
#else
    (void)by_xhat;
#endif
    if (w)
        for (ptrdiff_t i = 0; i < n; i++) {
            dx[i] = invrms * (dy[i] * w[i]) - c * x[i];
            dweight_rows[i] += dy[i] * (x[i] * invrms);
        }
    else
        for (ptrdiff_t i = 0; i < n; i++) {
            dx[i] = invrms * dy[i] - c * x[i];
            dweight_rows[i] += dy[i] * (x[i] * invrms);
        }
    FN_NAME(ln_add_residual_grad)(dx, ds, n);
}

static void FN_NAME(rms_backward_region)(fn_worker *wk, void *arg)
{
    const FN_NAME(ln_job) *j = arg;
    const ln_plan *p = j->p;
    const ptrdiff_t rows = p->rows, cols = p->cols;
    const FN_T *dy = j->dy, *x = j->x, *weights = j->w;
    const double *invrms = j->invstd;
    double *sums = j->sums, *part = j->part;
    FN_T *group = j->group;
    if (p->segments > 1) {
        FN_FOR(wk, i, rows * p->segments, 2 * p->segment_cols)
        {
            ptrdiff_t r = i / p->segments, c0 = ln_segment_start(p, i % p->segments);
            sums[i] = FN_NAME(rms_row_grad_dot)(dy + r * cols + c0, x + r * cols + c0, weights ? weights + c0 : NULL,
                                                ln_segment_len(p, c0), invrms[r]);
        }
        FN_FOR(wk, r, rows, p->segments)
        for (ptrdiff_t g = 1; g < p->segments; g++)
            sums[r * p->segments] += sums[r * p->segments + g];
    }
    FN_FOR(wk, t, p->chunks * p->segments, 3 * p->chunk_rows * p->segment_cols)
    {
        ptrdiff_t chunk = t / p->segments, c0 = ln_segment_start(p, t % p->segments);
        ptrdiff_t n = ln_segment_len(p, c0);
        ptrdiff_t r1 = fn_min((chunk + 1) * p->chunk_rows, rows);
        const FN_T *w = weights ? weights + c0 : NULL;
        for (ptrdiff_t r = chunk * p->chunk_rows; r < r1; r++) {
            double sum_gx = p->segments > 1 ? sums[r * p->segments]
                                            : FN_NAME(rms_row_grad_dot)(dy + r * cols, x + r * cols, w, n, invrms[r]);
#if FN_IS_F32
            const int by_xhat = fn_f32_range_scale(0.0, invrms[r]) != 1.0;
#else
            const int by_xhat = 0;
#endif
            const double c = rms_backward_c(invrms[r], sum_gx, cols) / (by_xhat ? invrms[r] : 1.0);
            FN_NAME(rms_backward_apply)(dy + r * cols + c0, x + r * cols + c0, j->y + r * cols + c0, n, w,
                                        (FN_T)invrms[r], (FN_T)c, by_xhat, group + chunk * cols + c0,
                                        j->ds ? j->ds + r * cols + c0 : NULL);
            if ((r + 1 - chunk * p->chunk_rows) % LN_ROW_GROUP == 0 || r + 1 == r1)
                FN_NAME(ln_flush_columns)(part + chunk * cols + c0, group + chunk * cols + c0, n);
        }
    }
}

/* rms_norm_backward, and with ds (not NULL) add_rms_norm_backward. */
static fn_status FN_NAME(rms_backward)(const FN_T *dy, const FN_T *ds, const FN_T *x, FN_T *dx, ptrdiff_t rows,
                                       ptrdiff_t cols, const double *invrms, const double *weight, double *dweight,
                                       int num_threads)
{
    const ln_plan p = ln_make_plan(rows, cols, num_threads);
    const ptrdiff_t part_values = p.chunks * cols;
    const ptrdiff_t row_sums = p.segments > 1 ? rows * p.segments : 0;
    const FN_T *weights, *unused_bias;
    void *params;
    if (FN_NAME(ln_params)(weight, NULL, cols, &weights, &unused_bias, &params) != FN_OK)
        return FN_NOMEM;
    /* dweight partial sums (float64), the rows' reduction sums of wide rows, then the row groups' dweight
     * terms (FN_T), all zeroed. */
    double *part = calloc(1, (size_t)(part_values + row_sums) * sizeof(double) + (size_t)part_values * sizeof(FN_T));
    if (part == NULL) {
        free(params);
        return FN_NOMEM;
    }
    double *sums = part + part_values;
    FN_T *group = (FN_T *)(sums + row_sums);
    FN_NAME(ln_job) j = {&p, x, dy, dx, weights, NULL, 0.0, NULL, NULL, NULL, invrms, NULL, sums, part, group, 0,
                         ds, NULL, NULL, 0};
    fn_team_run(p.threads, FN_NAME(rms_backward_region), &j);
    ln_merge_chunks(part, p.chunks, cols, dweight, p.threads);
    free(part);
    free(params);
    return FN_OK;
}

fn_status FN_NAME(fn_rms_norm_backward)(const FN_T *dy, const FN_T *x, FN_T *dx, ptrdiff_t rows, ptrdiff_t cols,
                                        const double *invrms, const double *weight, double *dweight,
                                        int num_threads)
{
    return FN_NAME(rms_backward)(dy, NULL, x, dx, rows, cols, invrms, weight, dweight, num_threads);
}
