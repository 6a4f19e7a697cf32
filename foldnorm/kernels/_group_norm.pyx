"""Group and instance normalization kernels (private; foldnorm.kernels.group_normalization checks every
argument).

x, y, dy and dx arrive C-contiguous, shaped (batch, channels, spatial), all float32 or all float64;
statistics (batch * groups values), per-channel parameters and gradients are C-contiguous float64 arrays;
weight and bias may be None.
"""
cimport numpy as cnp

from foldnorm.kernels._kernels cimport (
    attach_pool,
    check,
    element_type,
    fn_group_norm_backward_f32,
    fn_group_norm_backward_f64,
    fn_group_norm_f32,
    fn_group_norm_f64,
    fn_activation,
    fn_status,
    optional_values,
    tensor,
    values,
)

cnp.import_array()
attach_pool()


def forward(cnp.ndarray x not None, cnp.ndarray y not None, Py_ssize_t groups, cnp.ndarray weight,
            cnp.ndarray bias, double eps, int activation, cnp.ndarray mean not None,
            cnp.ndarray invstd not None, int num_threads):
    """Fill y (like x, then act(y)), and mean and invstd (float64, batch * groups values)."""
    cdef Py_ssize_t batch = x.shape[0], channels = x.shape[1], spatial = x.shape[2]
    cdef int t = element_type(x)
    cdef void *xp = tensor(x, t)
    cdef void *yp = tensor(y, t)
    cdef const double *w = optional_values(weight)
    cdef const double *b = optional_values(bias)
    cdef double *m = values(mean)
    cdef double *r = values(invstd)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_group_norm_f32(<const float *>xp, <float *>yp, batch, channels, spatial, groups, w, b,
                                       eps, <fn_activation>activation, m, r, num_threads)
        else:
            status = fn_group_norm_f64(<const double *>xp, <double *>yp, batch, channels, spatial, groups, w,
                                       b, eps, <fn_activation>activation, m, r, num_threads)
    check(status, "group normalization")


def backward(cnp.ndarray dy not None, cnp.ndarray x not None, cnp.ndarray dx not None, Py_ssize_t groups,
             cnp.ndarray mean not None, cnp.ndarray invstd not None, cnp.ndarray weight, cnp.ndarray bias,
             int activation, cnp.ndarray dweight not None, cnp.ndarray dbias not None, int num_threads):
    """Fill dx (like x), and dweight and dbias (float64, channels values); dy is the gradient of act(y)."""
    cdef Py_ssize_t batch = x.shape[0], channels = x.shape[1], spatial = x.shape[2]
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
            status = fn_group_norm_backward_f32(<const float *>dyp, <const float *>xp, <float *>dxp, batch,
                                                channels, spatial, groups, m, r, w, b, <fn_activation>activation,
                                                dw, db, num_threads)
        else:
            status = fn_group_norm_backward_f64(<const double *>dyp, <const double *>xp, <double *>dxp, batch,
                                                channels, spatial, groups, m, r, w, b, <fn_activation>activation,
                                                dw, db, num_threads)
    check(status, "group normalization")
