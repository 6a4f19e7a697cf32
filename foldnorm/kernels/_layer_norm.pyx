"""Layer and RMS normalization kernels (private; foldnorm.kernels.layer_normalization checks every argument).

x, y, dy and dx (and the residual variants' residual, s and ds) arrive C-contiguous, viewed as rows x cols, all float32 or all float64; weight, bias and
their gradients (cols values) and the statistics (one per row) are C-contiguous float64 arrays; weight and
bias may be None.
"""
cimport numpy as cnp

from foldnorm.kernels._kernels cimport (
    attach_pool,
    check,
    element_type,
    fn_add_layer_norm_backward_f32,
    fn_add_layer_norm_backward_f64,
    fn_add_layer_norm_f32,
    fn_add_layer_norm_f64,
    fn_add_rms_norm_backward_f32,
    fn_add_rms_norm_backward_f64,
    fn_add_rms_norm_f32,
    fn_add_rms_norm_f64,
    fn_layer_norm_backward_f32,
    fn_layer_norm_backward_f64,
    fn_layer_norm_f32,
    fn_layer_norm_f64,
    fn_rms_norm_backward_f32,
    fn_rms_norm_backward_f64,
    fn_rms_norm_f32,
    fn_rms_norm_f64,
    fn_status,
    optional_values,
    tensor,
    values,
)

cnp.import_array()
attach_pool()


def layer_norm(cnp.ndarray x not None, cnp.ndarray weight, cnp.ndarray bias, cnp.ndarray y not None,
               cnp.ndarray mean not None, cnp.ndarray invstd not None, Py_ssize_t rows, Py_ssize_t cols,
               double eps, int num_threads):
    """Fill y, and mean and invstd (float64, one per row)."""
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
            status = fn_layer_norm_f32(<const float *>xp, <float *>yp, rows, cols, w, b, eps, m, r, num_threads)
        else:
            status = fn_layer_norm_f64(<const double *>xp, <double *>yp, rows, cols, w, b, eps, m, r, num_threads)
    check(status, "layer normalization")


def layer_norm_backward(cnp.ndarray dy not None, cnp.ndarray x not None, cnp.ndarray mean not None,
                        cnp.ndarray invstd not None, cnp.ndarray weight, cnp.ndarray dx not None,
                        cnp.ndarray dweight not None, cnp.ndarray dbias not None, Py_ssize_t rows,
                        Py_ssize_t cols, int num_threads):
    """Fill dx, and dweight and dbias (float64, cols values)."""
    cdef int t = element_type(x)
    cdef void *dyp = tensor(dy, t)
    cdef void *xp = tensor(x, t)
    cdef void *dxp = tensor(dx, t)
    cdef const double *m = values(mean)
    cdef const double *r = values(invstd)
    cdef const double *w = optional_values(weight)
    cdef double *dw = values(dweight)
    cdef double *db = values(dbias)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_layer_norm_backward_f32(<const float *>dyp, <const float *>xp, <float *>dxp, rows, cols,
                                                m, r, w, dw, db, num_threads)
        else:
            status = fn_layer_norm_backward_f64(<const double *>dyp, <const double *>xp, <double *>dxp, rows,
                                                cols, m, r, w, dw, db, num_threads)
    check(status, "layer normalization")


def rms_norm(cnp.ndarray x not None, cnp.ndarray weight, cnp.ndarray y not None, cnp.ndarray invrms not None,
             Py_ssize_t rows, Py_ssize_t cols, double eps, int num_threads):
    """Fill y, and invrms (float64, one per row)."""
    cdef int t = element_type(x)
    cdef void *xp = tensor(x, t)
    cdef void *yp = tensor(y, t)
    cdef const double *w = optional_values(weight)
    cdef double *r = values(invrms)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_rms_norm_f32(<const float *>xp, <float *>yp, rows, cols, w, eps, r, num_threads)
        else:
            status = fn_rms_norm_f64(<const double *>xp, <double *>yp, rows, cols, w, eps, r, num_threads)
    check(status, "RMS normalization")


def rms_norm_backward(cnp.ndarray dy not None, cnp.ndarray x not None, cnp.ndarray invrms not None,
                      cnp.ndarray weight, cnp.ndarray dx not None, cnp.ndarray dweight not None, Py_ssize_t rows,
                      Py_ssize_t cols, int num_threads):
    """Fill dx, and dweight (float64, cols values)."""
    cdef int t = element_type(x)
    cdef void *dyp = tensor(dy, t)
    cdef void *xp = tensor(x, t)
    cdef void *dxp = tensor(dx, t)
    cdef const double *r = values(invrms)
    cdef const double *w = optional_values(weight)
    cdef double *dw = values(dweight)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_rms_norm_backward_f32(<const float *>dyp, <const float *>xp, <float *>dxp, rows, cols, r,
                                              w, dw, num_threads)
        else:
            status = fn_rms_norm_backward_f64(<const double *>dyp, <const double *>xp, <double *>dxp, rows, cols,
                                              r, w, dw, num_threads)
    check(status, "RMS normalization")


def add_layer_norm(cnp.ndarray x not None, cnp.ndarray residual not None, cnp.ndarray weight, cnp.ndarray bias,
                   cnp.ndarray y not None, cnp.ndarray s not None, cnp.ndarray mean not None,
                   cnp.ndarray invstd not None, Py_ssize_t rows, Py_ssize_t cols, double eps, int num_threads):
    """Fill s = x + residual, y = layer_norm(s), and mean and invstd of s (float64, one per row)."""
    cdef int t = element_type(x)
    cdef void *xp = tensor(x, t)
    cdef void *rp = tensor(residual, t)
    cdef void *yp = tensor(y, t)
    cdef void *sp = tensor(s, t)
    cdef const double *w = optional_values(weight)
    cdef const double *b = optional_values(bias)
    cdef double *m = values(mean)
    cdef double *r = values(invstd)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_add_layer_norm_f32(<const float *>xp, <const float *>rp, <float *>yp, <float *>sp, rows, cols,
                                           w, b, eps, m, r, num_threads)
        else:
            status = fn_add_layer_norm_f64(<const double *>xp, <const double *>rp, <double *>yp, <double *>sp, rows,
                                           cols, w, b, eps, m, r, num_threads)
    check(status, "layer normalization")


def add_rms_norm(cnp.ndarray x not None, cnp.ndarray residual not None, cnp.ndarray weight, cnp.ndarray y not None,
                 cnp.ndarray s not None, cnp.ndarray invrms not None, Py_ssize_t rows, Py_ssize_t cols, double eps,
                 int num_threads):
    """Fill s = x + residual, y = rms_norm(s), and invrms of s (float64, one per row)."""
    cdef int t = element_type(x)
    cdef void *xp = tensor(x, t)
    cdef void *rp = tensor(residual, t)
    cdef void *yp = tensor(y, t)
    cdef void *sp = tensor(s, t)
    cdef const double *w = optional_values(weight)
    cdef double *r = values(invrms)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_add_rms_norm_f32(<const float *>xp, <const float *>rp, <float *>yp, <float *>sp, rows, cols,
                                         w, eps, r, num_threads)
        else:
            status = fn_add_rms_norm_f64(<const double *>xp, <const double *>rp, <double *>yp, <double *>sp, rows,
                                         cols, w, eps, r, num_threads)
    check(status, "RMS normalization")


def add_layer_norm_backward(cnp.ndarray dy not None, cnp.ndarray ds not None, cnp.ndarray s not None,
                            cnp.ndarray mean not None, cnp.ndarray invstd not None, cnp.ndarray weight,
                            cnp.ndarray dx not None, cnp.ndarray dweight not None, cnp.ndarray dbias not None,
                            Py_ssize_t rows, Py_ssize_t cols, int num_threads):
    """Fill dx (the gradient of x and of residual), and dweight and dbias (float64, cols values)."""
    cdef int t = element_type(s)
    cdef void *dyp = tensor(dy, t)
    cdef void *dsp = tensor(ds, t)
    cdef void *sp = tensor(s, t)
    cdef void *dxp = tensor(dx, t)
    cdef const double *m = values(mean)
    cdef const double *r = values(invstd)
    cdef const double *w = optional_values(weight)
    cdef double *dw = values(dweight)
    cdef double *db = values(dbias)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_add_layer_norm_backward_f32(<const float *>dyp, <const float *>dsp, <const float *>sp,
                                                    <float *>dxp, rows, cols, m, r, w, dw, db, num_threads)
        else:
            status = fn_add_layer_norm_backward_f64(<const double *>dyp, <const double *>dsp, <const double *>sp,
                                                    <double *>dxp, rows, cols, m, r, w, dw, db, num_threads)
    check(status, "layer normalization")


def add_rms_norm_backward(cnp.ndarray dy not None, cnp.ndarray ds not None, cnp.ndarray s not None,
                          cnp.ndarray invrms not None, cnp.ndarray weight, cnp.ndarray dx not None,
                          cnp.ndarray dweight not None, Py_ssize_t rows, Py_ssize_t cols, int num_threads):
    """Fill dx (the gradient of x and of residual), and dweight (float64, cols values)."""
    cdef int t = element_type(s)
    cdef void *dyp = tensor(dy, t)
    cdef void *dsp = tensor(ds, t)
    cdef void *sp = tensor(s, t)
    cdef void *dxp = tensor(dx, t)
    cdef const double *r = values(invrms)
    cdef const double *w = optional_values(weight)
    cdef double *dw = values(dweight)
    cdef fn_status status
    with nogil:
        if t == cnp.NPY_FLOAT32:
            status = fn_add_rms_norm_backward_f32(<const float *>dyp, <const float *>dsp, <const float *>sp,
                                                  <float *>dxp, rows, cols, r, w, dw, num_threads)
        else:
            status = fn_add_rms_norm_backward_f64(<const double *>dyp, <const double *>dsp, <const double *>sp,
                                                  <double *>dxp, rows, cols, r, w, dw, num_threads)
    check(status, "RMS normalization")
