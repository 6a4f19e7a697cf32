"""Batch normalization kernels (private; foldnorm.kernels.batch_normalization checks every argument).

x, y, dy and dx arrive flattened, C-contiguous, all float32 or all float64; per-channel parameters,
statistics and gradients are C-contiguous float64 arrays; weight and bias may be None.
"""
cimport numpy as cnp

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
