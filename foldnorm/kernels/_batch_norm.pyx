"""Batch normalization kernels (private; foldnorm.kernels.batch_normalization checks every argument).

x, y, dy and dx arrive flattened, C-contiguous, all float32 or all float64; per-channel parameters,
statistics and gradients are C-contiguous float64 arrays; weight and bias may be None.
"""
cimport numpy as cnp
from libc.math cimport sqrt
from libc.stddef cimport ptrdiff_t

from foldnorm.kernels._kernels cimport (
    attach_pool,
    check,
    element_type,
    fn_batch_norm_backward_f32,
    fn_batch_norm_backward_f64,
    fn_batch_norm_f32,
    fn_batch_norm_f64,
    fn_batch_norm_train_f32,
    fn_batch_norm_train_f64,
    fn_activation,
    fn_bn_backward_elemt_f32,
    fn_bn_backward_elemt_f64,
    fn_bn_backward_reduce_f32,
    fn_bn_backward_reduce_f64,
    fn_bn_elemt_f32,
    fn_bn_elemt_f64,
    fn_bn_merge_grad_sums,
    fn_bn_merge_stats,
    fn_bn_stats_f32,
    fn_bn_stats_f64,
    fn_bn_update_running,
    fn_status,
    optional_values,
    tensor,
    values,
)

cnp.import_array()
attach_pool()


def batch_norm(cnp.ndarray x not None, cnp.ndarray y not None, Py_ssize_t outer, Py_ssize_t channels,
               Py_ssize_t inner, cnp.ndarray mean not None, cnp.ndarray var not None, cnp.ndarray weight,
               cnp.ndarray bias, double eps, int activation, int num_threads):
    """Fill y with the inference batch norm of x, shaped (outer, channels, inner), then act(y)."""
    cdef int t = element_type(x)
    cdef void *xp = tensor(x, t)
    cdef void *yp = tensor(y, t)
    cdef const double *m = values(mean)
    cdef const double *v = values(var)
    cdef const double *w = optional_values(weight)
    cdef const double *b = optional_values(bias)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_batch_norm_f32(<const float *>xp, <float *>yp, outer, channels, inner, m, v, w, b, eps,
                                       <fn_activation>activation, num_threads)
        else:
            status = fn_batch_norm_f64(<const double *>xp, <double *>yp, outer, channels, inner, m, v, w, b, eps,
                                       <fn_activation>activation, num_threads)
    check(status, "batch normalization")


def batch_norm_train(cnp.ndarray x not None, cnp.ndarray y not None, Py_ssize_t outer, Py_ssize_t channels,
                     Py_ssize_t inner, cnp.ndarray weight, cnp.ndarray bias, double eps, int activation,
                     cnp.ndarray mean not None, cnp.ndarray var not None, cnp.ndarray invstd not None,
                     int num_threads):
    """Fill mean, var and invstd (float64, one per channel) with the batch statistics, and y."""
    cdef int t = element_type(x)
    cdef void *xp = tensor(x, t)
    cdef void *yp = tensor(y, t)
    cdef const double *w = optional_values(weight)
    cdef const double *b = optional_values(bias)
    cdef double *m = values(mean)
    cdef double *v = values(var)
    cdef double *r = values(invstd)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_batch_norm_train_f32(<const float *>xp, <float *>yp, outer, channels, inner, w, b, eps,
                                             <fn_activation>activation, m, v, r, num_threads)
        else:
            status = fn_batch_norm_train_f64(<const double *>xp, <double *>yp, outer, channels, inner, w, b,
                                             eps, <fn_activation>activation, m, v, r, num_threads)
    check(status, "batch normalization")


def batch_norm_backward(cnp.ndarray dy not None, cnp.ndarray x not None, cnp.ndarray dx not None,
                        Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner, cnp.ndarray mean not None,
                        cnp.ndarray invstd not None, cnp.ndarray weight, cnp.ndarray bias, int activation,
                        cnp.ndarray dweight not None, cnp.ndarray dbias not None, int num_threads):
    """Fill dx, and dweight and dbias (float64, one per channel); dy is the gradient of act(y)."""
    cdef int t = element_type(x)
    cdef void *dyp = tensor(dy, t)
    cdef void *xp = tensor(x, t)
    cdef void *dxp = tensor(dx, t)
    cdef const double *m = values(mean)
    cdef const double *r = values(invstd)
    cdef const double *w = optional_values(weight)
    cdef const double *b = optional_values(bias)
    cdef double *dw = values(dweight)
    cdef double *db = values(dbias)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_batch_norm_backward_f32(<const float *>dyp, <const float *>xp, <float *>dxp, outer,
                                                channels, inner, m, r, w, b, <fn_activation>activation, dw, db,
                                                num_threads)
        else:
            status = fn_batch_norm_backward_f64(<const double *>dyp, <const double *>xp, <double *>dxp, outer,
                                                channels, inner, m, r, w, b, <fn_activation>activation, dw, db,
                                                num_threads)
    check(status, "batch normalization")


# The building blocks of the synchronized batch norm (src_c/bn_blocks.h; foldnorm.distributed checks every
# argument).  A shard may be empty.  A shard's summary is a row of 1 + 2C float64 values (its count, then two
# per-channel arrays); several shards' rows arrive as a C-contiguous float64 (parts, 1 + 2C) array.


cdef Py_ssize_t row_channels(cnp.ndarray rows) except -1:
    """C of a C-contiguous float64 (parts, 1 + 2C) array of summary rows, parts >= 1."""
    values(rows)
    if cnp.PyArray_NDIM(rows) != 2 or cnp.PyArray_DIM(rows, 0) < 1 or cnp.PyArray_DIM(rows, 1) % 2 != 1:
        raise ValueError("foldnorm: expected summary rows of shape (parts >= 1, 1 + 2C)")
    return cnp.PyArray_DIM(rows, 1) // 2


cdef cnp.ndarray channel_values(Py_ssize_t channels):
    cdef cnp.npy_intp n = channels
    return cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT64, 0)


ctypedef void (*row_merge)(ptrdiff_t parts, ptrdiff_t channels, const double *rows, double *count, double *a,
                           double *b) noexcept nogil


cdef tuple merged_rows(cnp.ndarray rows, row_merge merge):
    """(count, a, b) of a merge of summary rows: fn_bn_merge_stats or fn_bn_merge_grad_sums."""
    cdef Py_ssize_t channels = row_channels(rows)
    cdef cnp.ndarray a = channel_values(channels)
    cdef cnp.ndarray b = channel_values(channels)
    cdef const double *rp = values(rows)
    cdef double *ap = values(a)
    cdef double *bp = values(b)
    cdef double count
    with nogil:
        merge(cnp.PyArray_DIM(rows, 0), channels, rp, &count, ap, bp)
    return count, a, b


def bn_stats(cnp.ndarray x not None, Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
             cnp.ndarray row not None, int num_threads):
    """Fill row (float64, 1 + 2C) with the shard x's summary: count, mean and m2 per channel."""
    cdef int t = element_type(x)
    cdef void *xp = tensor(x, t)
    cdef double *r = values(row)
    if cnp.PyArray_SIZE(row) != 1 + 2 * channels:
        raise ValueError("foldnorm: expected a summary row of %d values" % (1 + 2 * channels))
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_bn_stats_f32(<const float *>xp, outer, channels, inner, r, num_threads)
        else:
            status = fn_bn_stats_f64(<const double *>xp, outer, channels, inner, r, num_threads)
    check(status, "batch normalization statistics")


def bn_merge_stats(cnp.ndarray rows not None):
    """(count, mean, m2) of the union of the shards whose summary rows are given, merged in order."""
    return merged_rows(rows, fn_bn_merge_stats)


def bn_gather_stats(cnp.ndarray rows not None, double eps, double momentum, cnp.ndarray running_mean,
                    cnp.ndarray running_var):
    """bn_merge_stats of the rows, then invstd = 1 / sqrt(m2 / count + eps) and, when count > 1 (the unbiased
    variance needs two values), the update of running_mean and running_var (float64, or None) in place; return
    (count, mean, invstd)."""
    merged_count, mean, invstd = merged_rows(rows, fn_bn_merge_stats)  # invstd holds m2 until computed from it
    cdef double count = merged_count
    cdef Py_ssize_t channels = cnp.PyArray_DIM(mean, 0)
    cdef const double *m = values(mean)
    cdef double *r = values(invstd)
    cdef double *rm = optional_values(running_mean)
    cdef double *rv = optional_values(running_var)
    cdef Py_ssize_t c
    with nogil:
        if count > 1.0:
            fn_bn_update_running(channels, count, m, r, momentum, rm, rv)
        for c in range(channels):
            r[c] = 1.0 / sqrt(r[c] / count + eps)
    return count, mean, invstd


def bn_elemt(cnp.ndarray x not None, cnp.ndarray y not None, Py_ssize_t outer, Py_ssize_t channels,
             Py_ssize_t inner, cnp.ndarray mean not None, cnp.ndarray invstd not None, cnp.ndarray weight,
             cnp.ndarray bias, int num_threads):
    """Fill y with the shard x normalized with the statistics given."""
    cdef int t = element_type(x)
    cdef void *xp = tensor(x, t)
    cdef void *yp = tensor(y, t)
    cdef const double *m = values(mean)
    cdef const double *r = values(invstd)
    cdef const double *w = optional_values(weight)
    cdef const double *b = optional_values(bias)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_bn_elemt_f32(<const float *>xp, <float *>yp, outer, channels, inner, m, r, w, b,
                                     num_threads)
        else:
            status = fn_bn_elemt_f64(<const double *>xp, <double *>yp, outer, channels, inner, m, r, w, b,
                                     num_threads)
    check(status, "batch normalization")


def bn_backward_reduce(cnp.ndarray dy not None, cnp.ndarray x not None, Py_ssize_t outer, Py_ssize_t channels,
                       Py_ssize_t inner, cnp.ndarray mean not None, cnp.ndarray invstd not None,
                       cnp.ndarray row not None, int num_threads):
    """Fill row (float64, 1 + 2C) with the shard's summary: count, sum_dy and sum_dy_xmu per channel."""
    cdef int t = element_type(x)
    cdef void *dyp = tensor(dy, t)
    cdef void *xp = tensor(x, t)
    cdef const double *m = values(mean)
    cdef const double *r = values(invstd)
    cdef double *s = values(row)
    if cnp.PyArray_SIZE(row) != 1 + 2 * channels:
        raise ValueError("foldnorm: expected a summary row of %d values" % (1 + 2 * channels))
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_bn_backward_reduce_f32(<const float *>dyp, <const float *>xp, outer, channels, inner, m, r,
                                               s, num_threads)
        else:
            status = fn_bn_backward_reduce_f64(<const double *>dyp, <const double *>xp, outer, channels, inner, m,
                                               r, s, num_threads)
    check(status, "batch normalization gradient sums")


def bn_merge_grad_sums(cnp.ndarray rows not None):
    """(count, sum_dy, sum_dy_xmu) of the shards whose summary rows are given, added up in order."""
    return merged_rows(rows, fn_bn_merge_grad_sums)


def bn_backward_elemt(cnp.ndarray dy not None, cnp.ndarray x not None, cnp.ndarray dx not None,
                      Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner, cnp.ndarray mean not None,
                      cnp.ndarray invstd not None, cnp.ndarray sum_dy not None, cnp.ndarray sum_dy_xmu not None,
                      double count, cnp.ndarray weight, int num_threads):
    """Fill dx of the shard from the whole batch's statistics, gradient sums and count."""
    cdef int t = element_type(x)
    cdef void *dyp = tensor(dy, t)
    cdef void *xp = tensor(x, t)
    cdef void *dxp = tensor(dx, t)
    cdef const double *m = values(mean)
    cdef const double *r = values(invstd)
    cdef const double *a = values(sum_dy)
    cdef const double *b = values(sum_dy_xmu)
    cdef const double *w = optional_values(weight)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_bn_backward_elemt_f32(<const float *>dyp, <const float *>xp, <float *>dxp, outer,
                                              channels, inner, m, r, a, b, count, w, num_threads)
        else:
            status = fn_bn_backward_elemt_f64(<const double *>dyp, <const double *>xp, <double *>dxp, outer,
                                              channels, inner, m, r, a, b, count, w, num_threads)
    check(status, "batch normalization")
