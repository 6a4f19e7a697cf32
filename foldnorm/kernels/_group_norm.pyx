"""Group and instance normalization kernels (private; see foldnorm.group_normalization).

The public module has already checked every argument: x, y, dy and dx are C-contiguous arrays of one
float32 or float64 dtype shaped (batch, channels, spatial); statistics and parameters are C-contiguous
float64 arrays of the right length, weight and bias possibly None.
"""
cimport numpy as cnp

cnp.import_array()

cdef extern from "group_norm.h" nogil:
    int FN_GN_OK
    int fn_group_norm_f32(const float *x, float *y, Py_ssize_t batch, Py_ssize_t channels,
                          Py_ssize_t spatial, Py_ssize_t groups, const double *weight, const double *bias,
                          double eps, double *mean, double *invstd, int num_threads)
    int fn_group_norm_f64(const double *x, double *y, Py_ssize_t batch, Py_ssize_t channels,
                          Py_ssize_t spatial, Py_ssize_t groups, const double *weight, const double *bias,
                          double eps, double *mean, double *invstd, int num_threads)
    int fn_group_norm_backward_f32(const float *dy, const float *x, float *dx, Py_ssize_t batch,
                                   Py_ssize_t channels, Py_ssize_t spatial, Py_ssize_t groups,
                                   const double *mean, const double *invstd, const double *weight,
                                   double *dweight, double *dbias, int num_threads)
    int fn_group_norm_backward_f64(const double *dy, const double *x, double *dx, Py_ssize_t batch,
                                   Py_ssize_t channels, Py_ssize_t spatial, Py_ssize_t groups,
                                   const double *mean, const double *invstd, const double *weight,
                                   double *dweight, double *dbias, int num_threads)


cdef double *_data_or_null(object a):
    if a is None:
        return NULL
    return <double *>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef void _check(int status) except *:
    if status != FN_GN_OK:
        raise MemoryError("foldnorm: out of memory for group normalization scratch space")


def forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t groups, object weight, object bias, double eps,
            cnp.ndarray mean, cnp.ndarray invstd, int num_threads):
    """Fill y (like x), and mean and invstd (float64, batch * groups values)."""
    cdef Py_ssize_t batch = x.shape[0], channels = x.shape[1], spatial = x.shape[2]
    cdef const double *w = _data_or_null(weight)
    cdef const double *b = _data_or_null(bias)
    cdef double *m = <double *>cnp.PyArray_DATA(mean)
    cdef double *r = <double *>cnp.PyArray_DATA(invstd)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef int status
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            status = fn_group_norm_f32(<const float *>xp, <float *>yp, batch, channels, spatial, groups, w, b,
                                       eps, m, r, num_threads)
    else:
        with nogil:
            status = fn_group_norm_f64(<const double *>xp, <double *>yp, batch, channels, spatial, groups, w,
                                       b, eps, m, r, num_threads)
    _check(status)


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t groups, cnp.ndarray mean,
             cnp.ndarray invstd, object weight, cnp.ndarray dweight, cnp.ndarray dbias, int num_threads):
    """Fill dx (like x), and dweight and dbias (float64, channels values)."""
    cdef Py_ssize_t batch = x.shape[0], channels = x.shape[1], spatial = x.shape[2]
    cdef const double *m = <const double *>cnp.PyArray_DATA(mean)
    cdef const double *r = <const double *>cnp.PyArray_DATA(invstd)
    cdef const double *w = _data_or_null(weight)
    cdef double *dw = <double *>cnp.PyArray_DATA(dweight)
    cdef double *db = <double *>cnp.PyArray_DATA(dbias)
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    cdef int status
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            status = fn_group_norm_backward_f32(<const float *>dyp, <const float *>xp, <float *>dxp, batch,
                                                channels, spatial, groups, m, r, w, dw, db, num_threads)
    else:
        with nogil:
            status = fn_group_norm_backward_f64(<const double *>dyp, <const double *>xp, <double *>dxp, batch,
                                                channels, spatial, groups, m, r, w, dw, db, num_threads)
    _check(status)
