/* The residual variants of layer and RMS normalization for one element type (see fn_instantiate.h):
 * s = x + residual is written, and normalized, in one pass over memory.  Instantiated by layer_norm.c after
 * layer_norm_impl.h, whose plan, statistics and apply loops they reuse.
 *
 * A row of s is computed into a per-thread buffer (in L1 or L2), written out from there, and normalized
 * from there: x and residual are read once, s and y written once.  Because a row is read whole before any
 * of it is written, s may be the same array as x or as residual, and y the same array as the other one
 * (vLLM's fused_add_rms_norm updates the residual stream in place that way); wide rows (segments) read
 * s back for their second pass, after every x and residual of the call has been read.
 */
#ifndef FN_T
#error "add_norm_impl.h is instantiated by layer_norm.c"
#endif

/* buf = x + residual, and s = buf, streamed when the whole output is large.  x, residual and s may be one
 * array: buf alone is restrict. */
FN_INLINE void FN_NAME(add_residual)(const FN_T *x, const FN_T *residual, FN_T *s, FN_T *restrict buf,
                                     ptrdiff_t n, int stream)
{
    for (ptrdiff_t i = 0; i < n; i++)
        buf[i] = x[i] + residual[i];
    if (stream)
        FN_NAME(fn_stream_store)(s, buf, n);
    else
        memcpy(s, buf, (size_t)n * sizeof(FN_T));
}

FN_VECTOR_KERNEL static void FN_NAME(add_ln_row)(const FN_T *x, const FN_T *residual, FN_T *s, FN_T *y,
                                                 ptrdiff_t cols, const FN_T *w, const FN_T *b, double eps,
                                                 double *mean, double *invstd, int stream, FN_T *buf)
{
    FN_NAME(add_residual)(x, residual, s, buf, cols, stream);
    fn_stats st = FN_NAME(fn_run_stats)(buf, cols);
    *mean = st.mean;
    *invstd = ln_invstd(st, eps);
    FN_NAME(ln_write)(buf, w, b, y, cols, FN_NAME(ln_row_of)(st, *invstd), stream);
}

FN_VECTOR_KERNEL static fn_stats FN_NAME(add_ln_segment)(const FN_T *x, const FN_T *residual, FN_T *s,
                                                         ptrdiff_t n, int stream, FN_T *buf)
{
    FN_NAME(add_residual)(x, residual, s, buf, n, stream);
    return FN_NAME(fn_run_stats)(buf, n);
}

FN_VECTOR_KERNEL static double FN_NAME(add_rms_row)(const FN_T *x, const FN_T *residual, FN_T *s, FN_T *y,
                                                    ptrdiff_t cols, const FN_T *w, double eps, int stream,
                                                    FN_T *buf)
{
    FN_NAME(add_residual)(x, residual, s, buf, cols, stream);
    double invrms = rms_invrms(FN_NAME(fn_sum_squares)(buf, cols), cols, eps);
    FN_NAME(rms_write)(buf, w, y, cols, FN_NAME(rms_row_of)(invrms), stream);
    return invrms;
}

FN_VECTOR_KERNEL static double FN_NAME(add_rms_segment)(const FN_T *x, const FN_T *residual, FN_T *s,
                                                        ptrdiff_t n, int stream, FN_T *buf)
{
    FN_NAME(add_residual)(x, residual, s, buf, n, stream);
    return FN_NAME(fn_sum_squares)(buf, n);
}

/* A thread's row buffer, on a cache line (NULL, and j->failed set, when it cannot be had). */
static FN_T *FN_NAME(add_row_buffer)(FN_NAME(ln_job) *j, void **raw)
{
    *raw = malloc((size_t)j->p->segment_cols * sizeof(FN_T) + FN_CACHE_LINE);
    if (*raw == NULL) {
        atomic_store(&j->failed, 1);
        return NULL;
    }
    return fn_cache_line_align(*raw);
}

/* Both residual forwards: RMS norm's job writes no mean (its statistic, invrms, goes to invstd_out). */
static void FN_NAME(add_norm_region)(fn_worker *w, void *arg)
{
    FN_NAME(ln_job) *j = arg;
    const ln_plan *p = j->p;
    const ptrdiff_t rows = p->rows, cols = p->cols;
    const int rms = j->mean_out == NULL;
    void *raw;
    FN_T *buf = FN_NAME(add_row_buffer)(j, &raw);
    if (p->segments == 1) {
        FN_FOR(w, r, rows, 4 * cols)
        {
            const ptrdiff_t o = r * cols;
            if (buf == NULL)
                continue;
            if (rms)
                j->invstd_out[r] = FN_NAME(add_rms_row)(j->x + o, j->residual + o, j->s + o, j->y + o, cols, j->w,
                                                        j->eps, j->stream, buf);
            else
                FN_NAME(add_ln_row)(j->x + o, j->residual + o, j->s + o, j->y + o, cols, j->w, j->b, j->eps,
                                    &j->mean_out[r], &j->invstd_out[r], j->stream, buf);
        }
    } else {
        /* s is read back by the second pass: written with ordinary stores. */
        FN_FOR(w, i, rows * p->segments, 3 * p->segment_cols)
        {
            const ptrdiff_t o = i / p->segments * cols + ln_segment_start(p, i % p->segments);
            const ptrdiff_t n = ln_segment_len(p, o % cols);
            if (buf == NULL)
                continue;
            if (rms)
                j->sums[i] = FN_NAME(add_rms_segment)(j->x + o, j->residual + o, j->s + o, n, 0, buf);
            else
                j->stats[i] = FN_NAME(add_ln_segment)(j->x + o, j->residual + o, j->s + o, n, 0, buf);
        }
        if (rms && !atomic_load(&j->failed))
            FN_NAME(rms_segments_finish)(w, j, j->s);
        else if (!atomic_load(&j->failed))
            FN_NAME(ln_segments_finish)(w, j, j->s);
    }
    free(raw);
}

/* Whether y and s are streamed to memory: when the two of them together are as large as fn_streams asks of
 * one output, since the call writes both (and reads as much again) before anything reads them. */
static int FN_NAME(add_streams)(ptrdiff_t rows, ptrdiff_t cols) { return fn_streams(2 * rows * cols, sizeof(FN_T)); }

/* The two residual forwards: the parameters in FN_T, the wide rows' segment partials, the region. */
static fn_status FN_NAME(add_norm_run)(FN_NAME(ln_job) *j, const double *weight, const double *bias,
                                       size_t partial_size)
{
    const ln_plan *p = j->p;
    void *params;
    if (FN_NAME(ln_params)(weight, bias, p->cols, &j->w, &j->b, &params) != FN_OK)
        return FN_NOMEM;
    void *partials = NULL;
    if (p->segments > 1) {
        partials = malloc((size_t)(p->rows * p->segments) * partial_size);
        if (partials == NULL) {
            free(params);
            return FN_NOMEM;
        }
        j->stats = partials;
        j->sums = partials;
    }
    fn_team_run(p->threads, FN_NAME(add_norm_region), j);
    free(partials);
    free(params);
    return atomic_load(&j->failed) ? FN_NOMEM : FN_OK;
}

fn_status FN_NAME(fn_add_layer_norm)(const FN_T *x, const FN_T *residual, FN_T *y, FN_T *s, ptrdiff_t rows,
                                     ptrdiff_t cols, const double *weight, const double *bias, double eps,
                                     double *mean, double *invstd, int num_threads)
{
    const ln_plan p = ln_make_plan(rows, cols, num_threads);
    FN_NAME(ln_job) j = {&p, x, NULL, y, NULL, NULL, eps, mean, invstd, NULL, NULL, NULL, NULL, NULL, NULL,
                         FN_NAME(add_streams)(rows, cols), NULL, residual, s, 0};
    return FN_NAME(add_norm_run)(&j, weight, bias, sizeof(fn_stats));
}

fn_status FN_NAME(fn_add_rms_norm)(const FN_T *x, const FN_T *residual, FN_T *y, FN_T *s, ptrdiff_t rows,
                                   ptrdiff_t cols, const double *weight, double eps, double *invrms,
                                   int num_threads)
{
    const ln_plan p = ln_make_plan(rows, cols, num_threads);
    FN_NAME(ln_job) j = {&p, x, NULL, y, NULL, NULL, eps, NULL, invrms, NULL, NULL, NULL, NULL, NULL, NULL,
                         FN_NAME(add_streams)(rows, cols), NULL, residual, s, 0};
    return FN_NAME(add_norm_run)(&j, weight, NULL, sizeof(double));
}

fn_status FN_NAME(fn_add_layer_norm_backward)(const FN_T *dy, const FN_T *ds, const FN_T *s, FN_T *dx,
                                              ptrdiff_t rows, ptrdiff_t cols, const double *mean,
                                              const double *invstd, const double *weight, double *dweight,
                                              double *dbias, int num_threads)
{
    return FN_NAME(ln_backward)(dy, ds, s, dx, rows, cols, mean, invstd, weight, dweight, dbias, num_threads);
}

fn_status FN_NAME(fn_add_rms_norm_backward)(const FN_T *dy, const FN_T *ds, const FN_T *s, FN_T *dx,
                                            ptrdiff_t rows, ptrdiff_t cols, const double *invrms,
                                            const double *weight, double *dweight, int num_threads)
{
    return FN_NAME(rms_backward)(dy, ds, s, dx, rows, cols, invrms, weight, dweight, num_threads);
}
