/* Group normalization's per-element loops, drivers and entry points for one element type (see
 * fn_instantiate.h): instantiated by group_norm.c, whose layout (gn_layout, gn_unit_of) they use. */
#ifndef FN_T
#error "group_norm_impl.h is instantiated by group_norm.c"
#endif

/* ---- The per-element loops: the vector-target dispatch points ---- */

FN_VECTOR_KERNEL static fn_stats FN_NAME(gn_run_stats)(const FN_T *x, ptrdiff_t n)
{
    return FN_NAME(fn_run_stats)(x, n);
}

/* y = (x - mean) * scale + shift, computed as (x * xscale - center) * alpha + beta: xscale is 1 unless the
 * block leaves float32's range (gn_xscale).  The apply loops subtract the mean rounded to FN_T before
 * scaling: for x near the mean that difference is exact, whereas x * alpha + beta with beta = -mean * alpha
 * rounds away the digits that tell the values of a large-mean block apart.  The rounding of the mean itself
 * is folded into the FN_T shift. */
typedef struct {
    FN_T center, alpha, beta, xscale;
} FN_NAME(gn_coefs);

FN_INLINE FN_NAME(gn_coefs) FN_NAME(gn_coefs_of)(double mean, double scale, double shift, double xscale)
{
    FN_NAME(gn_coefs) k;
    k.center = (FN_T)(mean * xscale);
    k.alpha = (FN_T)(scale / xscale);
    k.beta = (FN_T)(shift + ((double)k.center - mean * xscale) * (scale / xscale));
    k.xscale = (FN_T)xscale;
    return k;
}

FN_INLINE void FN_NAME(gn_values)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t n, FN_NAME(gn_coefs) k)
{
    const FN_T center = k.center, alpha = k.alpha, beta = k.beta;
#if FN_IS_F32
    if (k.xscale != 1) {
        const FN_T s = k.xscale;
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = (x[i] * s - center) * alpha + beta;
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = (x[i] - center) * alpha + beta;
}

/* With an activation, piece by L1-sized piece: each is activated as soon as it is written. */
FN_VECTOR_KERNEL static void FN_NAME(gn_normalize)(const FN_T *restrict x, FN_T *restrict y, ptrdiff_t n,
                                                   double mean, double scale, double shift, double xscale,
                                                   fn_activation act)
{
    const FN_NAME(gn_coefs) k = FN_NAME(gn_coefs_of)(mean, scale, shift, xscale);
    if (act == FN_ACT_NONE) {
        FN_NAME(gn_values)(x, y, n, k);
        return;
    }
    for (ptrdiff_t start = 0; start < n; start += FN_STATS_BLOCK) {
        const ptrdiff_t len = fn_min(n - start, FN_STATS_BLOCK);
        FN_NAME(gn_values)(x + start, y + start, len, k);
        FN_NAME(fn_activate_run)(y + start, len, act);
    }
}

/* g = dy * act'(pre) over a piece, pre recomputed from x as gn_normalize computes it. */
FN_VECTOR_KERNEL static void FN_NAME(gn_act_grad)(const FN_T *dy, const FN_T *x, FN_T *g, ptrdiff_t n, double mean,
                                                  double scale, double shift, double xscale, fn_activation act)
{
    FN_NAME(gn_values)(x, g, n, FN_NAME(gn_coefs_of)(mean, scale, shift, xscale));
    FN_NAME(fn_activation_grad_run)(dy, g, n, act);
}

/* gn_normalize written to memory with non-temporal stores, through an L1 buffer (for large outputs). */
static void FN_NAME(gn_normalize_streamed)(const FN_T *x, FN_T *y, ptrdiff_t n, double mean, double scale,
                                           double shift, double xscale, fn_activation act)
{
    FN_T piece[FN_STATS_BLOCK];
    for (ptrdiff_t start = 0; start < n; start += FN_STATS_BLOCK) {
        const ptrdiff_t len = fn_min(n - start, FN_STATS_BLOCK);
        FN_NAME(gn_normalize)(x + start, piece, len, mean, scale, shift, xscale, act);
        FN_NAME(fn_stream_store)(y + start, piece, len);
    }
}

/* sums[0] = sum(dy), sums[1] = sum(dy * (x - mean)) */
FN_VECTOR_KERNEL static void FN_NAME(gn_grad_sums)(const FN_T *dy, const FN_T *x, ptrdiff_t n, double mean,
                                                   double invstd, double sums[2])
{
    FN_NAME(fn_grad_sums)(dy, x, n, mean, invstd, sums);
}

/* dx = dy * dy_scale + (x - mean) * x_scale + shift, centred and scaled as gn_normalize (x_scale scales as
 * invstd^3 and would underflow float32 for large x without xscale). */
FN_VECTOR_KERNEL static void FN_NAME(gn_grad_apply)(const FN_T *restrict dy, const FN_T *restrict x,
                                                    FN_T *restrict dx, ptrdiff_t n, double dy_scale,
                                                    double mean, double x_scale, double shift, double xscale)
{
    const FN_T center = (FN_T)(mean * xscale);
    const FN_T a = (FN_T)dy_scale;
    const FN_T b = (FN_T)(x_scale / xscale);
    const FN_T c = (FN_T)(shift + ((double)center - mean * xscale) * (x_scale / xscale));
#if FN_IS_F32
    if (xscale != 1.0) {
        const FN_T s = (FN_T)xscale;
        for (ptrdiff_t i = 0; i < n; i++)
            dx[i] = dy[i] * a + (x[i] * s - center) * b + c;
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < n; i++)
        dx[i] = dy[i] * a + (x[i] - center) * b + c;
}

/* ---- Forward ---- */
/* The power of two gn_normalize and gn_grad_apply scale a block's values by: 1 unless a float32 block
 * leaves float32's range. */
static double FN_NAME(gn_xscale)(double mean, double invstd)
{
#if FN_IS_F32
    return fn_f32_range_scale(mean, invstd);
#else
    (void)mean;
    (void)invstd;
    return 1.0;
#endif
}


static fn_stats FN_NAME(gn_unit_stats)(const gn_layout *l, const FN_T *x, ptrdiff_t b, ptrdiff_t u)
{
    gn_unit t = gn_unit_of(l, u);
    ptrdiff_t start = gn_plane_index(l, b, t.first_plane) * l->spatial + t.begin;
    ptrdiff_t stop = gn_plane_index(l, b, t.end_plane - 1) * l->spatial + t.end;
    return FN_NAME(gn_run_stats)(x + start, stop - start);
}

static void FN_NAME(gn_normalize_unit)(const gn_layout *l, const FN_T *x, FN_T *y, ptrdiff_t b, ptrdiff_t u,
                                       const double *weight, const double *bias, double mean, double invstd,
                                       int stream, fn_activation act, int prefetch_next)
{
    gn_unit t = gn_unit_of(l, u);
    const double xscale = FN_NAME(gn_xscale)(mean, invstd);
    for (ptrdiff_t p = t.first_plane; p < t.end_plane; p++) {
        ptrdiff_t c = gn_channel_of(l, b, p);
        ptrdiff_t start = gn_plane_index(l, b, p) * l->spatial + t.begin;
        double scale = weight ? weight[c] * invstd : invstd;
        double shift = bias ? bias[c] : 0.0;
        if (prefetch_next)
            fn_prefetch_l2(x + start + l->group_channels * l->spatial, (size_t)(t.end - t.begin) * sizeof(FN_T));
        if (stream)
            FN_NAME(gn_normalize_streamed)(x + start, y + start, t.end - t.begin, mean, scale, shift, xscale, act);
        else
            FN_NAME(gn_normalize)(x + start, y + start, t.end - t.begin, mean, scale, shift, xscale, act);
    }
}

typedef struct {
    const gn_layout *l;
    const FN_T *x, *dy;
    FN_T *y; /* y, or dx */
    const double *weight, *bias;
    double eps;
    double *mean_out, *invstd_out; /* forward: the statistics written, which mean and invstd then read */
    const double *mean, *invstd;
    fn_stats *partial;
    double *sums, *coefs, *dweight, *dbias;
    ptrdiff_t channels;
    int stream;
    fn_activation act;
} FN_NAME(gn_job);

static void FN_NAME(gn_forward_region)(fn_worker *w, void *arg)
{
    const FN_NAME(gn_job) *j = arg;
    const gn_layout *l = j->l;
    const ptrdiff_t per_block = l->units_per_block;
    const ptrdiff_t block_len = l->group_channels * l->spatial;
    if (j->partial == NULL) {
        FN_FOR(w, b, l->blocks, 2 * block_len)
        {
            gn_finish_stats(FN_NAME(gn_unit_stats)(l, j->x, b, 0), j->eps, &j->mean_out[b], &j->invstd_out[b]);
            FN_NAME(gn_normalize_unit)(l, j->x, j->y, b, 0, j->weight, j->bias, j->mean[b], j->invstd[b],
                                       j->stream, j->act, b + 1 < l->blocks);
        }
        return;
    }
    const ptrdiff_t units = l->blocks * per_block;
    const ptrdiff_t unit_len = block_len / per_block;
    FN_FOR(w, i, units, unit_len)
    j->partial[i] = FN_NAME(gn_unit_stats)(l, j->x, i / per_block, i % per_block);
    FN_FOR(w, b, l->blocks, per_block)
    {
        fn_stats s = fn_stats_empty();
        for (ptrdiff_t u = 0; u < per_block; u++)
            fn_stats_merge(&s, j->partial[b * per_block + u]);
        gn_finish_stats(s, j->eps, &j->mean_out[b], &j->invstd_out[b]);
    }
    FN_FOR(w, i, units, unit_len)
    {
        ptrdiff_t b = i / per_block;
        FN_NAME(gn_normalize_unit)(l, j->x, j->y, b, i % per_block, j->weight, j->bias, j->mean[b], j->invstd[b],
                                   j->stream, j->act, 0);
    }
}

fn_status FN_NAME(fn_group_norm)(const FN_T *x, FN_T *y, ptrdiff_t batch, ptrdiff_t channels, ptrdiff_t spatial,
                                 ptrdiff_t groups, const double *weight, const double *bias, double eps,
                                 fn_activation activation, double *mean, double *invstd, int num_threads)
{
    const gn_layout l = gn_plan_layout(batch, channels, spatial, groups);
    const ptrdiff_t per_block = l.units_per_block;
    const ptrdiff_t units = l.blocks * per_block;
    const int parallel = batch * channels * spatial >= GN_PARALLEL_MIN;
    FN_NAME(gn_job) j = {&l, x, NULL, y, weight, bias, eps, mean, invstd, mean, invstd, NULL, NULL, NULL, NULL, NULL,
                         channels, 0, activation};
    /* A large y is streamed to memory: no read of each of its lines before it is written. */
    j.stream = fn_streams(batch * channels * spatial, sizeof(FN_T));
    if (per_block > 1) {
        j.partial = malloc((size_t)units * sizeof *j.partial);
        if (j.partial == NULL)
            return FN_NOMEM;
    }
    fn_team_run(parallel ? num_threads : 1, FN_NAME(gn_forward_region), &j);
    free(j.partial);
    return FN_OK;
}

/* ---- Backward ---- */

/* With an activation the backward passes take each plane run piece by piece: g = dy * act'(pre) recomputed
 * into an L1 piece (gn_act_grad), then the piece's sums or dx from g.  Given a cache of the unit's size (a
 * whole block, small enough to stay in this core's L2 between the two passes), the sums pass keeps every
 * piece's g there and the apply pass reads it back instead of recomputing it: the same values, half the
 * activation's arithmetic (SiLU's gradient costs an exp and a division per value), no more memory traffic. */
static void FN_NAME(gn_unit_grad_sums)(const FN_NAME(gn_job) *j, ptrdiff_t b, ptrdiff_t u, FN_T *cache)
{
    const gn_layout *l = j->l;
    const double mean = j->mean[b], invstd = j->invstd[b];
    gn_unit t = gn_unit_of(l, u);
    FN_T g[FN_STATS_BLOCK];
    for (ptrdiff_t p = t.first_plane; p < t.end_plane; p++) {
        ptrdiff_t start = gn_plane_index(l, b, p) * l->spatial + t.begin;
        double *out = gn_plane_sums(l, j->sums, b, p, t.chunk);
        const ptrdiff_t n = t.end - t.begin;
        if (j->act == FN_ACT_NONE) {
            FN_NAME(gn_grad_sums)(j->dy + start, j->x + start, n, mean, invstd, out);
            continue;
        }
        const ptrdiff_t c = gn_channel_of(l, b, p);
        const double scale = j->weight ? j->weight[c] * invstd : invstd, shift = j->bias ? j->bias[c] : 0.0;
        const double xscale = FN_NAME(gn_xscale)(mean, invstd);
        out[0] = out[1] = 0.0;
        for (ptrdiff_t k = 0; k < n; k += FN_STATS_BLOCK) {
            const ptrdiff_t len = fn_min(n - k, FN_STATS_BLOCK);
            double piece[2];
            FN_T *gk = cache ? cache + (p - t.first_plane) * n + k : g;
            FN_NAME(gn_act_grad)(j->dy + start + k, j->x + start + k, gk, len, mean, scale, shift, xscale, j->act);
            FN_NAME(gn_grad_sums)(gk, j->x + start + k, len, mean, invstd, piece);
            out[0] += piece[0];
            out[1] += piece[1];
        }
    }
}

static void FN_NAME(gn_grad_apply_unit)(const FN_NAME(gn_job) *j, ptrdiff_t b, ptrdiff_t u, const FN_T *cache)
{
    const gn_layout *l = j->l;
    const double mean = j->mean[b], invstd = j->invstd[b];
    const double *coef = &j->coefs[2 * b];
    gn_unit t = gn_unit_of(l, u);
    const double xscale = FN_NAME(gn_xscale)(mean, invstd);
    FN_T g[FN_STATS_BLOCK];
    for (ptrdiff_t p = t.first_plane; p < t.end_plane; p++) {
        ptrdiff_t start = gn_plane_index(l, b, p) * l->spatial + t.begin;
        const ptrdiff_t c = gn_channel_of(l, b, p), n = t.end - t.begin;
        double dy_scale = j->weight ? j->weight[c] * invstd : invstd;
        if (j->act == FN_ACT_NONE) {
            FN_NAME(gn_grad_apply)(j->dy + start, j->x + start, j->y + start, n, dy_scale, mean, coef[0], coef[1],
                                   xscale);
            continue;
        }
        const double shift = j->bias ? j->bias[c] : 0.0;
        for (ptrdiff_t k = 0; k < n; k += FN_STATS_BLOCK) {
            const ptrdiff_t len = fn_min(n - k, FN_STATS_BLOCK);
            const FN_T *gk = g;
            if (cache)
                gk = cache + (p - t.first_plane) * n + k;
            else
                FN_NAME(gn_act_grad)(j->dy + start + k, j->x + start + k, g, len, mean, dy_scale, shift, xscale,
                                     j->act);
            FN_NAME(gn_grad_apply)(gk, j->x + start + k, j->y + start + k, len, dy_scale, mean, coef[0], coef[1],
                                   xscale);
        }
    }
}

static void FN_NAME(gn_backward_region)(fn_worker *w, void *arg)
{
    const FN_NAME(gn_job) *j = arg;
    const gn_layout *l = j->l;
    const ptrdiff_t per_block = l->units_per_block;
    const ptrdiff_t units = l->blocks * per_block;
    const ptrdiff_t block_len = l->group_channels * l->spatial;
    if (per_block == 1) {
        /* This thread's cache of a block's g (see gn_unit_grad_sums); without one, g is recomputed. */
        FN_T *cache = NULL;
        if (j->act != FN_ACT_NONE && block_len * (ptrdiff_t)sizeof(FN_T) <= GN_GRAD_CACHE_BYTES)
            cache = malloc((size_t)block_len * sizeof(FN_T));
        FN_FOR(w, b, l->blocks, 3 * block_len)
        {
            FN_NAME(gn_unit_grad_sums)(j, b, 0, cache);
            gn_block_grad_coefficients(l, j->sums, b, j->weight, j->invstd[b], &j->coefs[2 * b]);
            FN_NAME(gn_grad_apply_unit)(j, b, 0, cache);
        }
        free(cache);
    } else {
        const ptrdiff_t unit_len = block_len / per_block;
        FN_FOR(w, i, units, 2 * unit_len)
        FN_NAME(gn_unit_grad_sums)(j, i / per_block, i % per_block, NULL);
        FN_FOR(w, b, l->blocks, l->group_channels * l->chunks_per_plane)
        gn_block_grad_coefficients(l, j->sums, b, j->weight, j->invstd[b], &j->coefs[2 * b]);
        FN_FOR(w, i, units, 3 * unit_len)
        FN_NAME(gn_grad_apply_unit)(j, i / per_block, i % per_block, NULL);
    }
    /* Per-channel sums over the batch, in batch order; chunk 0 holds each plane's total by now. */
    const ptrdiff_t batch = l->blocks / l->groups;
    FN_FOR(w, c, j->channels, 2 * batch)
    {
        ptrdiff_t g = c / l->group_channels, p = c % l->group_channels;
        double sum_dy = 0.0, sum_dy_xhat = 0.0;
        for (ptrdiff_t n = 0; n < batch; n++) {
            ptrdiff_t b = n * l->groups + g;
            const double *total = gn_plane_sums(l, j->sums, b, p, 0);
            sum_dy += total[0];
            sum_dy_xhat += j->invstd[b] * total[1];
        }
        j->dbias[c] = sum_dy;
        j->dweight[c] = sum_dy_xhat;
    }
}

fn_status FN_NAME(fn_group_norm_backward)(const FN_T *dy, const FN_T *x, FN_T *dx, ptrdiff_t batch,
                                          ptrdiff_t channels, ptrdiff_t spatial, ptrdiff_t groups,
                                          const double *mean, const double *invstd, const double *weight,
                                          const double *bias, fn_activation activation, double *dweight,
                                          double *dbias, int num_threads)
{
    const gn_layout l = gn_plan_layout(batch, channels, spatial, groups);
    const int parallel = batch * channels * spatial >= GN_PARALLEL_MIN;
    const size_t nsums = 2 * (size_t)(batch * channels * l.chunks_per_plane);
    double *sums = malloc((nsums + 2 * (size_t)l.blocks) * sizeof *sums);
    if (sums == NULL)
        return FN_NOMEM;
    FN_NAME(gn_job) j = {&l, x, dy, dx, weight, bias, 0.0, NULL, NULL, mean, invstd, NULL, sums, sums + nsums,
                         dweight, dbias, channels, 0, activation};
    fn_team_run(parallel ? num_threads : 1, FN_NAME(gn_backward_region), &j);
    free(sums);
    return FN_OK;
}
