/* Batch normalization's per-element loops and entry points for one element type (see fn_instantiate.h):
 * instantiated by batch_norm.c, whose plan (bn_plan, bn_unit_extent) and merges they use. */
#ifndef FN_T
#error "batch_norm_impl.h is instantiated by batch_norm.c"
#endif

/* Per-channel statistics of a block of `rows` rows: an exact two-pass along the channels, BN_ROWS_PER_SWEEP
 * rows at a time.  The second pass also sums the deviations, which corrects the mean for the rounding of
 * the float64 sum of the first, for double input only: a block sums at most BN_ROW_BLOCK_ELEMS / 2 values
 * per channel (it has at least 2 channels), and for floats (24-bit significands) that sum is exact unless
 * the values span more than 2^15 in magnitude, and within one float64 rounding otherwise. */
FN_VECTOR_KERNEL static void FN_NAME(bn_block_column_stats)(const FN_T *restrict x, ptrdiff_t rows,
                                                            ptrdiff_t channels, double *restrict mean,
                                                            double *restrict m2, double *restrict residual)
{
    const ptrdiff_t body = rows - rows % BN_ROWS_PER_SWEEP;
    for (ptrdiff_t c = 0; c < channels; c++)
        mean[c] = 0.0;
    for (ptrdiff_t r = 0; r < body; r += BN_ROWS_PER_SWEEP) {
        const FN_T *restrict a = x + r * channels;
        const FN_T *restrict b = a + channels;
        const FN_T *restrict d = b + channels;
        const FN_T *restrict e = d + channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            mean[c] += ((double)a[c] + (double)b[c]) + ((double)d[c] + (double)e[c]);
    }
    for (ptrdiff_t r = body; r < rows; r++) {
        const FN_T *restrict a = x + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            mean[c] += (double)a[c];
    }
    for (ptrdiff_t c = 0; c < channels; c++) {
        mean[c] /= (double)rows;
        residual[c] = 0.0;
        m2[c] = 0.0;
    }

#if !FN_IS_F32
    for (ptrdiff_t r = 0; r < rows; r++) {
        const FN_T *restrict a = x + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            residual[c] += (double)a[c] - mean[c];
    }
#endif
    for (ptrdiff_t r = 0; r < body; r += BN_ROWS_PER_SWEEP) {
        const FN_T *restrict a = x + r * channels;
        const FN_T *restrict b = a + channels;
        const FN_T *restrict d = b + channels;
        const FN_T *restrict e = d + channels;
        for (ptrdiff_t c = 0; c < channels; c++) {
            double da = (double)a[c] - mean[c], db = (double)b[c] - mean[c];
            double dd = (double)d[c] - mean[c], de = (double)e[c] - mean[c];
            m2[c] += (da * da + db * db) + (dd * dd + de * de);
        }
    }
    for (ptrdiff_t r = body; r < rows; r++) {
        const FN_T *restrict a = x + r * channels;
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
FN_VECTOR_KERNEL static fn_stats FN_NAME(bn_unit_stats)(const FN_T *x, ptrdiff_t n)
{
    return FN_NAME(fn_block_stats)(x, n);
}

FN_VECTOR_KERNEL static void FN_NAME(bn_unit_grad_sums)(const FN_T *dy, const FN_T *x, ptrdiff_t n,
                                                        double mean, double invstd, double sums[2])
{
    FN_NAME(fn_grad_sums)(dy, x, n, mean, invstd, sums);
}

/* The statistics of every unit: fn_stats of a plane unit, or per-channel means and M2s of a row block (each
 * thread with its own residual scratch). */
typedef struct {
    const FN_T *x;
    const bn_plan *p;
    fn_stats *unit_stats;
    double *unit_mean, *unit_m2;
    atomic_int failed;
} FN_NAME(bn_stats_job);

static void FN_NAME(bn_stats_region)(fn_worker *w, void *arg)
{
    FN_NAME(bn_stats_job) *j = arg;
    const bn_plan *p = j->p;
    if (!p->rows) {
        FN_FOR(w, u, p->units, p->unit_len)
        {
            bn_extent e = bn_unit_extent(p, u);
            j->unit_stats[u] = FN_NAME(bn_unit_stats)(j->x + e.offset, e.len);
        }
        return;
    }
    const ptrdiff_t channels = p->channels;
    double *residual = malloc((size_t)channels * sizeof(double));
    if (residual == NULL)
        atomic_store(&j->failed, 1);
    FN_FOR(w, u, p->units, p->unit_len * channels)
    {
        if (residual == NULL)
            continue;
        bn_extent e = bn_unit_extent(p, u);
        FN_NAME(bn_block_column_stats)(j->x + e.offset, e.len, channels, j->unit_mean + u * channels,
                                       j->unit_m2 + u * channels, residual);
    }
    free(residual);
}

/* Batch mean and biased variance of every channel: per-unit statistics, then the fixed-order merge. */
static fn_status FN_NAME(bn_statistics)(const FN_T *x, const bn_plan *p, double *mean, double *var,
                                        int num_threads)
{
    const ptrdiff_t units = p->units;
    FN_NAME(bn_stats_job) j = {x, p, NULL, NULL, NULL, 0};
    if (!p->rows) {
        j.unit_stats = malloc((size_t)units * sizeof(fn_stats));
        if (j.unit_stats == NULL)
            return FN_NOMEM;
        fn_team_run(num_threads, FN_NAME(bn_stats_region), &j);
        bn_merge_plane_stats(p, j.unit_stats, mean, var, num_threads);
        free(j.unit_stats);
        return FN_OK;
    }

    const ptrdiff_t channels = p->channels;
    double *unit_partials = malloc((size_t)units * (size_t)channels * 2 * sizeof(double));
    if (unit_partials == NULL)
        return FN_NOMEM;
    j.unit_mean = unit_partials;
    j.unit_m2 = unit_partials + units * channels;
    fn_team_run(num_threads, FN_NAME(bn_stats_region), &j);
    const int failed = atomic_load(&j.failed);
    if (!failed)
        bn_merge_row_stats(p, j.unit_mean, j.unit_m2, mean, var, num_threads);
    free(unit_partials);
    return failed ? FN_NOMEM : FN_OK;
}

/* y = (x - shift) * alpha + beta along one run of a channel. */
FN_INLINE void FN_NAME(bn_shifted_run)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t n, FN_T shift,
                                       FN_T alpha, FN_T beta)
{
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = (x[i] - shift) * alpha + beta;
}

FN_INLINE void FN_NAME(bn_affine_run)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t n, FN_T alpha,
                                      FN_T beta)
{
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = x[i] * alpha + beta;
}

/* The row loops apply the activation to each row as soon as it is written, while it is in L1. */
FN_INLINE void FN_NAME(bn_shifted_rows_with)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t rows,
                                                      ptrdiff_t channels, const FN_T *restrict shift,
                                                      const FN_T *restrict alpha, const FN_T *restrict beta,
                                                      fn_activation act)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const FN_T *restrict xr = x + r * channels;
        FN_T *restrict yr = y + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            yr[c] = (xr[c] - shift[c]) * alpha[c] + beta[c];
        FN_NAME(fn_activate_run)(yr, channels, act);
    }
}

FN_VECTOR_KERNEL static void FN_NAME(bn_shifted_rows)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t rows,
                                                      ptrdiff_t channels, const FN_T *restrict shift,
                                                      const FN_T *restrict alpha, const FN_T *restrict beta,
                                                      fn_activation act)
{
    /* Without an activation the rows run without its test: the constant folds it away. */
    if (act == FN_ACT_NONE)
        FN_NAME(bn_shifted_rows_with)(x, y, rows, channels, shift, alpha, beta, FN_ACT_NONE);
    else
        FN_NAME(bn_shifted_rows_with)(x, y, rows, channels, shift, alpha, beta, act);
}

FN_INLINE void FN_NAME(bn_affine_rows_with)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t rows,
                                                     ptrdiff_t channels, const FN_T *restrict alpha,
                                                     const FN_T *restrict beta, fn_activation act)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const FN_T *restrict xr = x + r * channels;
        FN_T *restrict yr = y + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            yr[c] = xr[c] * alpha[c] + beta[c];
        FN_NAME(fn_activate_run)(yr, channels, act);
    }
}

FN_VECTOR_KERNEL static void FN_NAME(bn_affine_rows)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t rows,
                                                     ptrdiff_t channels, const FN_T *restrict alpha,
                                                     const FN_T *restrict beta, fn_activation act)
{
    /* Without an activation the rows run without its test: the constant folds it away. */
    if (act == FN_ACT_NONE)
        FN_NAME(bn_affine_rows_with)(x, y, rows, channels, alpha, beta, FN_ACT_NONE);
    else
        FN_NAME(bn_affine_rows_with)(x, y, rows, channels, alpha, beta, act);
}

/* The loops of inputs with a channel that leaves float32's range: y = (x * xscale - shift) * alpha + beta, with
 * xscale 1 for the other channels (for which x * 1 - shift is the plain loops' x - shift). */
FN_INLINE void FN_NAME(bn_scaled_run)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t n, FN_T xscale,
                                      FN_T shift, FN_T alpha, FN_T beta)
{
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = (x[i] * xscale - shift) * alpha + beta;
}

FN_INLINE void FN_NAME(bn_scaled_rows_with)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t rows,
                                                     ptrdiff_t channels, const FN_T *restrict xscale,
                                                     const FN_T *restrict shift, const FN_T *restrict alpha,
                                                     const FN_T *restrict beta, fn_activation act)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const FN_T *restrict xr = x + r * channels;
        FN_T *restrict yr = y + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            yr[c] = (xr[c] * xscale[c] - shift[c]) * alpha[c] + beta[c];
        FN_NAME(fn_activate_run)(yr, channels, act);
    }
}

FN_VECTOR_KERNEL static void FN_NAME(bn_scaled_rows)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t rows,
                                                     ptrdiff_t channels, const FN_T *restrict xscale,
                                                     const FN_T *restrict shift, const FN_T *restrict alpha,
                                                     const FN_T *restrict beta, fn_activation act)
{
    /* Without an activation the rows run without its test: the constant folds it away. */
    if (act == FN_ACT_NONE)
        FN_NAME(bn_scaled_rows_with)(x, y, rows, channels, xscale, shift, alpha, beta, FN_ACT_NONE);
    else
        FN_NAME(bn_scaled_rows_with)(x, y, rows, channels, xscale, shift, alpha, beta, act);
}

/* y = the normalization of a block of rows, as bn_apply writes it (the backward pass recomputes it). */
FN_INLINE void FN_NAME(bn_rows)(const FN_T *x, FN_T *y, ptrdiff_t rows, ptrdiff_t channels, const FN_T *xscale,
                                const FN_T *shift, const FN_T *alpha, const FN_T *beta, fn_activation act)
{
    if (xscale != NULL)
        FN_NAME(bn_scaled_rows)(x, y, rows, channels, xscale, shift, alpha, beta, act);
    else if (shift != NULL)
        FN_NAME(bn_shifted_rows)(x, y, rows, channels, shift, alpha, beta, act);
    else
        FN_NAME(bn_affine_rows)(x, y, rows, channels, alpha, beta, act);
}

/* One run of a plane: y = (x * xscale - shift) * alpha + beta when xscale is given, (x - shift) * alpha + beta
 * when shift is, else x * alpha + beta; then the activation, while the run is in L1. */
FN_INLINE void FN_NAME(bn_plane_values)(const FN_T *x, FN_T *y, ptrdiff_t n, const FN_T *xscale,
                                        const FN_T *shift, ptrdiff_t c, const FN_T *alpha, const FN_T *beta)
{
    if (xscale != NULL)
        FN_NAME(bn_scaled_run)(x, y, n, xscale[c], shift[c], alpha[c], beta[c]);
    else if (shift != NULL)
        FN_NAME(bn_shifted_run)(x, y, n, shift[c], alpha[c], beta[c]);
    else
        FN_NAME(bn_affine_run)(x, y, n, alpha[c], beta[c]);
}

FN_VECTOR_KERNEL static void FN_NAME(bn_plane_run)(const FN_T *x, FN_T *y, ptrdiff_t n, const FN_T *xscale,
                                                   const FN_T *shift, ptrdiff_t c, const FN_T *alpha,
                                                   const FN_T *beta, fn_activation act)
{
    FN_NAME(bn_plane_values)(x, y, n, xscale, shift, c, alpha, beta);
    FN_NAME(fn_activate_run)(y, n, act);
}

/* g = dy * act'(pre) along one run of a plane, pre recomputed from x as bn_plane_run computes it. */
FN_VECTOR_KERNEL static void FN_NAME(bn_plane_act_grad)(const FN_T *dy, const FN_T *x, FN_T *g, ptrdiff_t n,
                                                        const FN_T *xscale, const FN_T *shift, ptrdiff_t c,
                                                        const FN_T *alpha, const FN_T *beta, fn_activation act)
{
    FN_NAME(bn_plane_values)(x, g, n, xscale, shift, c, alpha, beta);
    FN_NAME(fn_activation_grad_run)(dy, g, n, act);
}

/* The same for a block of rows. */
FN_VECTOR_KERNEL static void FN_NAME(bn_rows_act_grad)(const FN_T *dy, const FN_T *x, FN_T *g, ptrdiff_t rows,
                                                       ptrdiff_t channels, const FN_T *xscale, const FN_T *shift,
                                                       const FN_T *alpha, const FN_T *beta, fn_activation act)
{
    FN_NAME(bn_rows)(x, g, rows, channels, xscale, shift, alpha, beta, FN_ACT_NONE);
    FN_NAME(fn_activation_grad_run)(dy, g, rows * channels, act);
}

typedef struct {
    const FN_T *x;
    FN_T *y;
    const bn_plan *p;
    const FN_T *xscale, *shift, *alpha, *beta;
    int stream;
    fn_activation act;
} FN_NAME(bn_apply_job);

static void FN_NAME(bn_apply_region)(fn_worker *w, void *arg)
{
    const FN_NAME(bn_apply_job) *j = arg;
    const bn_plan *p = j->p;
    const FN_T *x = j->x, *xscale = j->xscale, *shift = j->shift, *alpha = j->alpha, *beta = j->beta;
    FN_T *y = j->y;
    FN_T piece[FN_STATS_BLOCK];
    FN_FOR(w, u, p->units, p->rows ? p->unit_len * p->channels : p->unit_len)
    {
        bn_extent e = bn_unit_extent(p, u);
        if (p->rows)
            FN_NAME(bn_rows)(x + e.offset, y + e.offset, e.len, p->channels, xscale, shift, alpha, beta, j->act);
        else if (j->stream) {
            FN_NAME(bn_plane_run)(x + e.offset, piece, e.len, xscale, shift, e.channel, alpha, beta, j->act);
            FN_NAME(fn_stream_store)(y + e.offset, piece, e.len);
        } else
            FN_NAME(bn_plane_run)(x + e.offset, y + e.offset, e.len, xscale, shift, e.channel, alpha, beta, j->act);
    }
}

/* The one pass over x that writes y: y = (x - shift) * alpha + beta per channel, or x * alpha + beta
 * when shift is NULL, or (x * xscale - shift) * alpha + beta when xscale is not, then act.  A large output of
 * planes is computed piece by piece into L1 and streamed out. */
static void FN_NAME(bn_apply)(const FN_T *x, FN_T *y, const bn_plan *p, const FN_T *xscale, const FN_T *shift,
                              const FN_T *alpha, const FN_T *beta, fn_activation act, int num_threads)
{
    const int stream = !p->rows && fn_streams(p->outer * p->channels * p->inner, sizeof(FN_T));
    FN_NAME(bn_apply_job) j = {x, y, p, xscale, shift, alpha, beta, stream, act};
    fn_team_run(num_threads, FN_NAME(bn_apply_region), &j);
}

#if FN_IS_F32
/* The coefficients of a channel that leaves float32's range (fn_f32_range_scale gave s): y = (x * s - shift)
 * * alpha + beta, the centring and the scaling as in batch_norm_train, of x scaled by s. */
static void FN_NAME(bn_scaled_coefficients)(double mean, double invstd, double weight, double bias, double s,
                                            FN_T *xscale, FN_T *shift, FN_T *alpha, FN_T *beta)
{
    *xscale = (FN_T)s;
    *shift = (FN_T)(mean * s);
    *alpha = (FN_T)(weight * invstd / s);
    *beta = (FN_T)(bias - (mean * s - (double)*shift) * (double)*alpha);
}
#endif

fn_status FN_NAME(fn_batch_norm)(const FN_T *x, FN_T *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                                 const double *mean, const double *var, const double *weight, const double *bias,
                                 double eps, fn_activation activation, int num_threads)
{
    const bn_plan p = bn_make_plan(outer, channels, inner);
    FN_T *coefs = malloc((size_t)channels * 4 * sizeof(FN_T));
    if (coefs == NULL)
        return FN_NOMEM;
    FN_T *alpha = coefs, *beta = coefs + channels, *shift = coefs + 2 * channels, *xscale = coefs + 3 * channels;
    int scaled = 0;
    for (ptrdiff_t c = 0; c < channels; c++) {
        double invstd = 1.0 / sqrt(var[c] + eps);
        alpha[c] = (FN_T)((weight ? weight[c] : 1.0) * invstd);
        /* beta from the rounded alpha makes y = (x - mean) * alpha + bias hold near the mean, where the
         * rounding of alpha would otherwise be multiplied by the whole mean. */
        beta[c] = (FN_T)((bias ? bias[c] : 0.0) - mean[c] * (double)alpha[c]);
        shift[c] = 0;
        xscale[c] = 1;
#if FN_IS_F32
        /* A channel that leaves float32's range is applied as batch_norm_train does, x scaled and shifted. */
        const double s = fn_f32_range_scale(mean[c], invstd);
        if (s != 1.0) {
            scaled = 1;
            FN_NAME(bn_scaled_coefficients)(mean[c], invstd, weight ? weight[c] : 1.0, bias ? bias[c] : 0.0, s,
                                            &xscale[c], &shift[c], &alpha[c], &beta[c]);
        }
#endif
    }
    FN_NAME(bn_apply)(x, y, &p, scaled ? xscale : NULL, scaled ? shift : NULL, alpha, beta, activation, num_threads);
    free(coefs);
    return FN_OK;
}

/* The coefficients of batch_norm_train's y = (x * xscale - shift) * alpha + beta (coefs holds shift, alpha,
 * beta and xscale, `channels` each); returns whether a channel needs xscale.  The backward pass of an
 * activation recomputes y with them. */
static int FN_NAME(bn_train_coefficients)(const double *mean, const double *invstd, const double *weight,
                                          const double *bias, ptrdiff_t channels, FN_T *coefs)
{
    FN_T *shift = coefs, *alpha = coefs + channels, *beta = coefs + 2 * channels, *xscale = coefs + 3 * channels;
    int scaled = 0;
    for (ptrdiff_t c = 0; c < channels; c++) {
        alpha[c] = (FN_T)((weight ? weight[c] : 1.0) * invstd[c]);
        /* Subtracting the rounded mean first keeps x - shift exact for data far from zero (mean 1e3,
         * std 1 in float32); beta carries the rest of the mean, (mean - shift) * alpha, in float64. */
        shift[c] = (FN_T)mean[c];
        beta[c] = (FN_T)((bias ? bias[c] : 0.0) - (mean[c] - (double)shift[c]) * (double)alpha[c]);
        xscale[c] = 1;
#if FN_IS_F32
        const double s = fn_f32_range_scale(mean[c], invstd[c]);
        if (s != 1.0) {
            scaled = 1;
            FN_NAME(bn_scaled_coefficients)(mean[c], invstd[c], weight ? weight[c] : 1.0, bias ? bias[c] : 0.0, s,
                                            &xscale[c], &shift[c], &alpha[c], &beta[c]);
        }
#endif
    }
    return scaled;
}

/* y = act((x - mean) * invstd * weight + bias) with the statistics given: the apply of the training forward,
 * which the building block fn_bn_elemt shares. */
static fn_status FN_NAME(bn_normalize)(const FN_T *x, FN_T *y, const bn_plan *p, const double *mean,
                                       const double *invstd, const double *weight, const double *bias,
                                       fn_activation activation, int num_threads)
{
    const ptrdiff_t channels = p->channels;
    FN_T *coefs = malloc((size_t)channels * 4 * sizeof(FN_T));
    if (coefs == NULL)
        return FN_NOMEM;
    const int scaled = FN_NAME(bn_train_coefficients)(mean, invstd, weight, bias, channels, coefs);
    FN_NAME(bn_apply)(x, y, p, scaled ? coefs + 3 * channels : NULL, coefs, coefs + channels, coefs + 2 * channels,
                      activation, num_threads);
    free(coefs);
    return FN_OK;
}

fn_status FN_NAME(fn_batch_norm_train)(const FN_T *x, FN_T *y, ptrdiff_t outer, ptrdiff_t channels,
                                       ptrdiff_t inner, const double *weight, const double *bias, double eps,
                                       fn_activation activation, double *mean, double *var, double *invstd,
                                       int num_threads)
{
    const bn_plan p = bn_make_plan(outer, channels, inner);
    if (FN_NAME(bn_statistics)(x, &p, mean, var, num_threads) != FN_OK)
        return FN_NOMEM;
    for (ptrdiff_t c = 0; c < channels; c++)
        invstd[c] = 1.0 / sqrt(var[c] + eps);
    return FN_NAME(bn_normalize)(x, y, &p, mean, invstd, weight, bias, activation, num_threads);
}

/* The per-channel gradient sums of a block of rows, BN_ROWS_PER_SWEEP rows per sweep over the accumulators. */
FN_VECTOR_KERNEL static void FN_NAME(bn_grad_sums_rows)(const FN_T *restrict dy, const FN_T *restrict x,
                                                        ptrdiff_t rows, ptrdiff_t channels,
                                                        const double *restrict mean, double *restrict sum_dy,
                                                        double *restrict sum_dy_xc)
{
    const ptrdiff_t body = rows - rows % BN_ROWS_PER_SWEEP;
    for (ptrdiff_t c = 0; c < channels; c++) {
        sum_dy[c] = 0.0;
        sum_dy_xc[c] = 0.0;
    }
    for (ptrdiff_t r = 0; r < body; r += BN_ROWS_PER_SWEEP) {
        const ptrdiff_t o = r * channels;
        const FN_T *restrict ga = dy + o, *restrict gb = ga + channels;
        const FN_T *restrict gd = gb + channels, *restrict ge = gd + channels;
        const FN_T *restrict xa = x + o, *restrict xb = xa + channels;
        const FN_T *restrict xd = xb + channels, *restrict xe = xd + channels;
        for (ptrdiff_t c = 0; c < channels; c++) {
            double a = (double)ga[c], b = (double)gb[c], d = (double)gd[c], e = (double)ge[c];
            sum_dy[c] += (a + b) + (d + e);
            sum_dy_xc[c] += (a * ((double)xa[c] - mean[c]) + b * ((double)xb[c] - mean[c])) +
                            (d * ((double)xd[c] - mean[c]) + e * ((double)xe[c] - mean[c]));
        }
    }
    for (ptrdiff_t r = body; r < rows; r++) {
        const FN_T *restrict ga = dy + r * channels;
        const FN_T *restrict xa = x + r * channels;
        for (ptrdiff_t c = 0; c < channels; c++) {
            double a = (double)ga[c];
            sum_dy[c] += a;
            sum_dy_xc[c] += a * ((double)xa[c] - mean[c]);
        }
    }
}

/* dx = (dy + (x * xscale - shift) * slope + offset) * alpha along one run of a channel; xscale is 1 unless the
 * channel leaves float32's range. */
FN_VECTOR_KERNEL static void FN_NAME(bn_grad_run)(const FN_T *restrict dy, const FN_T *restrict x,
                                                  FN_T *restrict dx, ptrdiff_t n, FN_T alpha, FN_T xscale,
                                                  FN_T shift, FN_T slope, FN_T offset)
{
#if FN_IS_F32
    if (xscale != 1) {
        for (ptrdiff_t i = 0; i < n; i++)
            dx[i] = (dy[i] + (x[i] * xscale - shift) * slope + offset) * alpha;
        return;
    }
#else
    (void)xscale;
#endif
    for (ptrdiff_t i = 0; i < n; i++)
        dx[i] = (dy[i] + (x[i] - shift) * slope + offset) * alpha;
}

/* The same for a block of rows; xscale is NULL unless a channel leaves float32's range. */
FN_VECTOR_KERNEL static void FN_NAME(bn_grad_rows)(const FN_T *restrict dy, const FN_T *restrict x,
                                                   FN_T *restrict dx, ptrdiff_t rows, ptrdiff_t channels,
                                                   const FN_T *restrict alpha, const FN_T *restrict xscale,
                                                   const FN_T *restrict shift, const FN_T *restrict slope,
                                                   const FN_T *restrict offset)
{
#if FN_IS_F32
    if (xscale != NULL) {
        for (ptrdiff_t r = 0; r < rows; r++) {
            const ptrdiff_t o = r * channels;
            for (ptrdiff_t c = 0; c < channels; c++)
                dx[o + c] = (dy[o + c] + (x[o + c] * xscale[c] - shift[c]) * slope[c] + offset[c]) * alpha[c];
        }
        return;
    }
#else
    (void)xscale;
#endif
    for (ptrdiff_t r = 0; r < rows; r++) {
        const ptrdiff_t o = r * channels;
        for (ptrdiff_t c = 0; c < channels; c++)
            dx[o + c] = (dy[o + c] + (x[o + c] - shift[c]) * slope[c] + offset[c]) * alpha[c];
    }
}

/* The backward pass's two parallel steps: the per-unit gradient sums, then dx. */
typedef struct {
    const FN_T *dy, *x;
    FN_T *dx;
    const bn_plan *p;
    const double *mean, *invstd;
    double *unit_sums;
    size_t sums_per_unit;
    const FN_T *alpha, *xscale, *shift, *slope, *offset; /* xscale NULL unless a channel leaves float32's range */
    int stream;
    fn_activation act;
    /* With an activation: the forward's coefficients (bn_train_coefficients), pre_xscale NULL unless needed. */
    const FN_T *pre_xscale, *pre_shift, *pre_alpha, *pre_beta;
    atomic_int failed;
} FN_NAME(bn_grad_job);

/* dy, or with an activation g = dy * act'(y before it) of a unit, recomputed into buf (a unit's worth). */
static const FN_T *FN_NAME(bn_unit_grad)(const FN_NAME(bn_grad_job) *j, bn_extent e, FN_T *buf)
{
    const bn_plan *p = j->p;
    if (j->act == FN_ACT_NONE)
        return j->dy + e.offset;
    if (p->rows)
        FN_NAME(bn_rows_act_grad)(j->dy + e.offset, j->x + e.offset, buf, e.len, p->channels, j->pre_xscale,
                                  j->pre_shift, j->pre_alpha, j->pre_beta, j->act);
    else
        FN_NAME(bn_plane_act_grad)(j->dy + e.offset, j->x + e.offset, buf, e.len, j->pre_xscale, j->pre_shift,
                                   e.channel, j->pre_alpha, j->pre_beta, j->act);
    return buf;
}

/* The scratch a thread needs for bn_unit_grad: none without an activation, a plane unit on the stack, a row
 * block from the heap (NULL and j->failed set when it cannot be had). */
static FN_T *FN_NAME(bn_grad_scratch)(FN_NAME(bn_grad_job) *j, FN_T *piece)
{
    if (j->act == FN_ACT_NONE || !j->p->rows)
        return piece;
    FN_T *buf = malloc((size_t)(j->p->unit_len * j->p->channels) * sizeof(FN_T));
    if (buf == NULL)
        atomic_store(&j->failed, 1);
    return buf;
}

static void FN_NAME(bn_grad_sums_region)(fn_worker *w, void *arg)
{
    FN_NAME(bn_grad_job) *j = arg;
    const bn_plan *p = j->p;
    FN_T piece[FN_STATS_BLOCK];
    FN_T *buf = FN_NAME(bn_grad_scratch)(j, piece);
    FN_FOR(w, u, p->units, 2 * (p->rows ? p->unit_len * p->channels : p->unit_len))
    {
        if (buf == NULL)
            continue;
        bn_extent e = bn_unit_extent(p, u);
        double *sums = j->unit_sums + (size_t)u * j->sums_per_unit;
        const FN_T *g = FN_NAME(bn_unit_grad)(j, e, buf);
        if (p->rows)
            FN_NAME(bn_grad_sums_rows)(g, j->x + e.offset, e.len, p->channels, j->mean, sums, sums + p->channels);
        else
            FN_NAME(bn_unit_grad_sums)(g, j->x + e.offset, e.len, j->mean[e.channel], j->invstd[e.channel], sums);
    }
    if (buf != piece)
        free(buf);
}

/* dx of one plane unit from its g; a large dx is computed into the L1 piece and streamed out. */
static void FN_NAME(bn_grad_plane_unit)(const FN_NAME(bn_grad_job) *j, bn_extent e, const FN_T *g, FN_T *piece)
{
    const ptrdiff_t c = e.channel;
    const FN_T xs = j->xscale != NULL ? j->xscale[c] : 1;
    FN_T *out = j->stream ? piece : j->dx + e.offset;
    FN_NAME(bn_grad_run)(g, j->x + e.offset, out, e.len, j->alpha[c], xs, j->shift[c], j->slope[c], j->offset[c]);
    if (j->stream)
        FN_NAME(fn_stream_store)(j->dx + e.offset, piece, e.len);
}

static void FN_NAME(bn_grad_apply_region)(fn_worker *w, void *arg)
{
    FN_NAME(bn_grad_job) *j = arg;
    const bn_plan *p = j->p;
    FN_T piece[FN_STATS_BLOCK], grad_piece[FN_STATS_BLOCK];
    FN_T *buf = FN_NAME(bn_grad_scratch)(j, grad_piece);
    FN_FOR(w, u, p->units, 3 * (p->rows ? p->unit_len * p->channels : p->unit_len))
    {
        if (buf == NULL)
            continue;
        bn_extent e = bn_unit_extent(p, u);
        const FN_T *g = FN_NAME(bn_unit_grad)(j, e, buf);
        if (p->rows)
            FN_NAME(bn_grad_rows)(g, j->x + e.offset, j->dx + e.offset, e.len, p->channels, j->alpha, j->xscale,
                                  j->shift, j->slope, j->offset);
        else
            FN_NAME(bn_grad_plane_unit)(j, e, g, piece);
    }
    if (buf != grad_piece)
        free(buf);
}

/* The forward's coefficients for a backward pass with an activation, which recomputes its pre-activation
 * (4 per channel in pre): the job's pre_* set from them.  Nothing without an activation. */
static void FN_NAME(bn_grad_pre)(FN_NAME(bn_grad_job) *j, const double *weight, const double *bias,
                                 ptrdiff_t channels, FN_T *pre)
{
    if (j->act == FN_ACT_NONE)
        return;
    const int scaled = FN_NAME(bn_train_coefficients)(j->mean, j->invstd, weight, bias, channels, pre);
    j->pre_shift = pre;
    j->pre_alpha = pre + channels;
    j->pre_beta = pre + 2 * channels;
    j->pre_xscale = scaled ? pre + 3 * channels : NULL;
}

/* sum_dy = sum(g) and sum_dy_xc = sum(g * (x - mean)) per channel, g = dy, or dy * act'(pre) with an
 * activation: the backward pass's reduction, which the building block fn_bn_backward_reduce shares. */
static fn_status FN_NAME(bn_grad_sums)(const FN_T *dy, const FN_T *x, const bn_plan *p, const double *mean,
                                       const double *invstd, const double *weight, const double *bias,
                                       fn_activation activation, double *sum_dy, double *sum_dy_xc, int num_threads)
{
    const size_t sums_per_unit = p->rows ? 2 * (size_t)p->channels : 2;
    double *unit_sums = malloc(((size_t)p->units * sums_per_unit + 1) * sizeof(double));
    FN_T *pre = malloc((size_t)p->channels * 4 * sizeof(FN_T));
    if (unit_sums == NULL || pre == NULL) {
        free(unit_sums);
        free(pre);
        return FN_NOMEM;
    }
    FN_NAME(bn_grad_job) j = {.dy = dy, .x = x, .p = p, .mean = mean, .invstd = invstd, .unit_sums = unit_sums,
                              .sums_per_unit = sums_per_unit, .act = activation};
    FN_NAME(bn_grad_pre)(&j, weight, bias, p->channels, pre);
    fn_team_run(num_threads, FN_NAME(bn_grad_sums_region), &j);
    const int failed = atomic_load(&j.failed);
    if (!failed) {
        if (p->rows)
            bn_merge_row_sums(p, unit_sums, sum_dy, sum_dy_xc, num_threads);
        else
            bn_merge_plane_sums(p, unit_sums, sum_dy, sum_dy_xc, num_threads);
    }
    free(unit_sums);
    free(pre);
    return failed ? FN_NOMEM : FN_OK;
}

/* dx's coefficients of channel c (five per channel in coefs: alpha, shift, slope, offset, xscale), from the
 * channel's gradient sums over the whole batch: dx = (g + (x * xscale - shift) * slope + offset) * alpha.
 * Returns 1 when the channel's x is scaled to stay in float32's range. */
static int FN_NAME(bn_grad_channel_coefficients)(FN_T *coefs, ptrdiff_t channels, ptrdiff_t c, double mean,
                                                 double invstd, double sum_dy, double sum_dy_xc, double count,
                                                 const double *weight)
{
    const double dweight = sum_dy_xc * invstd;
    /* dx = alpha * (dy + slope * (x - mean) - dbias / n) with (x - mean) = (x - shift) - (mean - shift)
     * as in the forward pass.  Keeping the factor alpha = weight * invstd outside leaves every
     * coefficient on the scale of dy, so none underflows when invstd is tiny (x near 1e30). */
    /* A channel that leaves float32's range has x scaled by s first, as in the forward pass. */
#if FN_IS_F32
    const double s = fn_f32_range_scale(mean, invstd);
#else
    const double s = 1.0;
#endif
    const double slope64 = -invstd * (dweight / count) / s;
    const FN_T shift = (FN_T)(mean * s);
    coefs[c] = (FN_T)((weight ? weight[c] : 1.0) * invstd);
    coefs[channels + c] = shift;
    coefs[2 * channels + c] = (FN_T)slope64;
    /* rest is 0 when the mean is exact in FN_T; skipping the product then keeps an infinite slope (inf
     * in x) from making 0 * inf = NaN of the whole channel, where NumPy's formula gives +-inf. */
    const double rest = mean * s - (double)shift;
    coefs[3 * channels + c] = (FN_T)(-(sum_dy / count) - (rest != 0.0 ? slope64 * rest : 0.0));
    coefs[4 * channels + c] = (FN_T)s;
    return s != 1.0;
}

/* dx = weight * invstd * (g - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xc / count), the sums and
 * count those of the whole batch, g as in bn_grad_sums: the backward pass's apply, which the building block
 * fn_bn_backward_elemt shares. */
static fn_status FN_NAME(bn_grad_apply)(const FN_T *dy, const FN_T *x, FN_T *dx, const bn_plan *p,
                                        const double *mean, const double *invstd, const double *sum_dy,
                                        const double *sum_dy_xc, double count, const double *weight,
                                        const double *bias, fn_activation activation, int num_threads)
{
    const ptrdiff_t channels = p->channels;
    /* dx's coefficients (5 per channel), then the forward's (4 per channel). */
    FN_T *coefs = malloc((size_t)channels * 9 * sizeof(FN_T));
    if (coefs == NULL)
        return FN_NOMEM;
    FN_T *alpha = coefs, *shift = coefs + channels, *slope = coefs + 2 * channels;
    FN_T *offset = coefs + 3 * channels, *xscale = coefs + 4 * channels;
    int scaled = 0;
    for (ptrdiff_t c = 0; c < channels; c++)
        scaled |= FN_NAME(bn_grad_channel_coefficients)(coefs, channels, c, mean[c], invstd[c], sum_dy[c],
                                                        sum_dy_xc[c], count, weight);
    /* As in bn_apply: a large dx of planes is computed into L1 and streamed out. */
    FN_NAME(bn_grad_job) j = {.dy = dy, .x = x, .dx = dx, .p = p, .mean = mean, .invstd = invstd, .alpha = alpha,
                              .xscale = scaled ? xscale : NULL, .shift = shift, .slope = slope, .offset = offset,
                              .stream = !p->rows && fn_streams(p->outer * channels * p->inner, sizeof(FN_T)),
                              .act = activation};
    FN_NAME(bn_grad_pre)(&j, weight, bias, channels, coefs + 5 * channels);
    fn_team_run(num_threads, FN_NAME(bn_grad_apply_region), &j);
    free(coefs);
    return atomic_load(&j.failed) ? FN_NOMEM : FN_OK;
}

/* ---- The backward pass a channel at a time ---- */

/* Planes with channels to spare for every thread: a thread takes whole channels.  It adds a channel's unit
 * sums over (n, piece) in the order bn_merge_plane_sums does, makes the channel's dx coefficients, then writes
 * its dx while the channel's x and dy (a batch of planes, often small enough for this core's L2) are still in
 * cache, so that the second pass reads them from there rather than from memory; with an activation, a
 * thread's cache of the channel's g (BN_GRAD_CACHE_BYTES at most) saves recomputing it.  The same values as
 * bn_grad_sums then bn_grad_apply, bit for bit: the same unit sums, added in the same order. */
typedef struct {
    FN_NAME(bn_grad_job) base;
    double *sum_dy, *sum_dy_xc;
    const double *weight;
    FN_T *coefs;
} FN_NAME(bn_channel_grad_job);

static void FN_NAME(bn_grad_channels_region)(fn_worker *w, void *arg)
{
    FN_NAME(bn_channel_grad_job) *cj = arg;
    FN_NAME(bn_grad_job) *j = &cj->base;
    const bn_plan *p = j->p;
    const ptrdiff_t channel_len = p->outer * p->inner;
    FN_T piece[FN_STATS_BLOCK], grad_piece[FN_STATS_BLOCK];
    FN_T *cache = NULL;
    if (j->act != FN_ACT_NONE && channel_len * (ptrdiff_t)sizeof(FN_T) <= BN_GRAD_CACHE_BYTES)
        cache = malloc((size_t)channel_len * sizeof(FN_T)); /* NULL: g is recomputed */
    FN_FOR(w, c, p->channels, 5 * channel_len)
    {
        double sum_dy = 0.0, sum_dy_xc = 0.0;
        for (ptrdiff_t n = 0; n < p->outer; n++)
            for (ptrdiff_t k = 0; k < p->pieces; k++) {
                const bn_extent e = bn_unit_extent(p, (n * p->channels + c) * p->pieces + k);
                FN_T *buf = cache != NULL ? cache + n * p->inner + k * p->unit_len : grad_piece;
                double sums[2];
                FN_NAME(bn_unit_grad_sums)(FN_NAME(bn_unit_grad)(j, e, buf), j->x + e.offset, e.len, j->mean[c],
                                           j->invstd[c], sums);
                sum_dy += sums[0];
                sum_dy_xc += sums[1];
            }
        cj->sum_dy[c] = sum_dy;
        cj->sum_dy_xc[c] = sum_dy_xc;
        FN_NAME(bn_grad_channel_coefficients)(cj->coefs, p->channels, c, j->mean[c], j->invstd[c], sum_dy,
                                              sum_dy_xc, (double)channel_len, cj->weight);
        for (ptrdiff_t n = 0; n < p->outer; n++)
            for (ptrdiff_t k = 0; k < p->pieces; k++) {
                const bn_extent e = bn_unit_extent(p, (n * p->channels + c) * p->pieces + k);
                const FN_T *g = cache != NULL ? cache + n * p->inner + k * p->unit_len
                                              : FN_NAME(bn_unit_grad)(j, e, grad_piece);
                FN_NAME(bn_grad_plane_unit)(j, e, g, piece);
            }
    }
    free(cache);
}

static fn_status FN_NAME(bn_backward_channels)(const FN_T *dy, const FN_T *x, FN_T *dx, const bn_plan *p,
                                               const double *mean, const double *invstd, const double *weight,
                                               const double *bias, fn_activation activation, double *sum_dy,
                                               double *sum_dy_xc, int num_threads)
{
    const ptrdiff_t channels = p->channels;
    /* dx's coefficients (5 per channel), then the forward's (4 per channel). */
    FN_T *coefs = malloc((size_t)channels * 9 * sizeof(FN_T));
    if (coefs == NULL)
        return FN_NOMEM;
    FN_NAME(bn_channel_grad_job) cj = {
        .base = {.dy = dy, .x = x, .dx = dx, .p = p, .mean = mean, .invstd = invstd, .alpha = coefs,
                 .shift = coefs + channels, .slope = coefs + 2 * channels, .offset = coefs + 3 * channels,
                 .xscale = coefs + 4 * channels,
                 .stream = fn_streams(p->outer * channels * p->inner, sizeof(FN_T)), .act = activation},
        .sum_dy = sum_dy, .sum_dy_xc = sum_dy_xc, .weight = weight, .coefs = coefs};
    FN_NAME(bn_grad_pre)(&cj.base, weight, bias, channels, coefs + 5 * channels);
    fn_team_run(num_threads, FN_NAME(bn_grad_channels_region), &cj);
    free(coefs);
    return FN_OK;
}

fn_status FN_NAME(fn_batch_norm_backward)(const FN_T *dy, const FN_T *x, FN_T *dx, ptrdiff_t outer,
                                          ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                                          const double *invstd, const double *weight, const double *bias,
                                          fn_activation activation, double *dweight, double *dbias,
                                          int num_threads)
{
    const bn_plan p = bn_make_plan(outer, channels, inner);
    fn_status status;
    if (bn_backward_by_channel(&p, sizeof(FN_T), num_threads))
        status = FN_NAME(bn_backward_channels)(dy, x, dx, &p, mean, invstd, weight, bias, activation, dbias,
                                               dweight, num_threads);
    else if (FN_NAME(bn_grad_sums)(dy, x, &p, mean, invstd, weight, bias, activation, dbias, dweight, num_threads)
             != FN_OK)
        return FN_NOMEM;
    else
        status = FN_NAME(bn_grad_apply)(dy, x, dx, &p, mean, invstd, dbias, dweight,
                                        (double)p.outer * (double)p.inner, weight, bias, activation, num_threads);
    for (ptrdiff_t c = 0; c < channels; c++)
        dweight[c] *= invstd[c];
    return status;
}
