"""Layer and RMS normalization kernels (private; foldnorm.layer_normalization checks the arguments).

Every array is C-contiguous in the compute dtype (float32 or float64, the same for all arrays of a call);
weight and bias may be None.  The GIL is released while the C kernel runs.
"""
cimport numpy as cnp
from libc.stddef cimport ptrdiff_t

cnp.import_array()

cdef extern from "layer_norm.h":
    int fn_layer_norm_f32(const float *x, const float *weight, const float *bias, float *y, float *mean,
                          float *invstd, ptrdiff_t rows, ptrdiff_t cols, double eps, int num_threads) nogil
    int fn_layer_norm_f64(const double *x, const double *weight, const double *bias, double *y,
                          double *mean, double *invstd, ptrdiff_t rows, ptrdiff_t cols, double eps,
                          int num_threads) nogil
    int fn_layer_norm_backward_f32(const float *dy, const float *x, const float *mean, const float *invstd,
                                   const float *weight, float *dx, float *dweight, float *dbias,
                                   ptrdiff_t rows, ptrdiff_t cols, int num_threads) nogil
    int fn_layer_norm_backward_f64(const double *dy, const double *x, const double *mean,
                                   const double *invstd, const double *weight, double *dx, double *dweight,
                                   double *dbias, ptrdiff_t rows, ptrdiff_t cols, int num_threads) nogil
    int fn_rms_norm_f32(const float *x, const float *weight, float *y, float *invrms, ptrdiff_t rows,
                        ptrdiff_t cols, double eps, int num_threads) nogil
    int fn_rms_norm_f64(const double *x, const double *weight, double *y, double *invrms, ptrdiff_t rows,
                        ptrdiff_t cols, double eps, int num_threads) nogil
    int fn_rms_norm_backward_f32(const float *dy, const float *x, const float *invrms, const float *weight,
                                 float *dx, float *dweight, ptrdiff_t rows, ptrdiff_t cols,
                                 int num_threads) nogil
    int fn_rms_norm_backward_f64(const double *dy, const double *x, const double *invrms,
                                 const double *weight, double *dx, double *dweight, ptrdiff_t rows,
                                 ptrdiff_t cols, int num_threads) nogil


cdef inline void *_data(object a):
    """The data pointer of an ndarray, or NULL for None."""
    if a is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline bint _is_float64(cnp.ndarray a):
    return cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64


cdef inline _check_status(int status):
    if status != 0:
        raise MemoryError("foldnorm: could not allocate the kernel's scratch memory")


def layer_norm(cnp.ndarray x, weight, bias, cnp.ndarray y, cnp.ndarray mean, cnp.ndarray invstd,
               ptrdiff_t rows, ptrdiff_t cols, double eps, int num_threads):
    cdef void *px = _data(x)
    cdef void *pw = _data(weight)
    cdef void *pb = _data(bias)
    cdef void *py = _data(y)
    cdef void *pm = _data(mean)
    cdef void *pi = _data(invstd)
    cdef bint f64 = _is_float64(x)
    cdef int status
    with nogil:
        if f64:
            status = fn_layer_norm_f64(<const double *>px, <const double *>pw, <const double *>pb,
                                       <double *>py, <double *>pm, <double *>pi, rows, cols, eps,
                                       num_threads)
        else:
            status = fn_layer_norm_f32(<const float *>px, <const float *>pw, <const float *>pb,
                                       <float *>py, <float *>pm, <float *>pi, rows, cols, eps, num_threads)
    _check_status(status)


def layer_norm_backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray mean, cnp.ndarray invstd, weight,
                        cnp.ndarray dx, cnp.ndarray dweight, cnp.ndarray dbias, ptrdiff_t rows,
                        ptrdiff_t cols, int num_threads):
    cdef void *pdy = _data(dy)
    cdef void *px = _data(x)
    cdef void *pm = _data(mean)
    cdef void *pi = _data(invstd)
    cdef void *pw = _data(weight)
    cdef void *pdx = _data(dx)
    cdef void *pdw = _data(dweight)
    cdef void *pdb = _data(dbias)
    cdef bint f64 = _is_float64(x)
    cdef int status
    with nogil:
        if f64:
            status = fn_layer_norm_backward_f64(<const double *>pdy, <const double *>px, <const double *>pm,
                                                <const double *>pi, <const double *>pw, <double *>pdx,
                                                <double *>pdw, <double *>pdb, rows, cols, num_threads)
        else:
            status = fn_layer_norm_backward_f32(<const float *>pdy, <const float *>px, <const float *>pm,
                                                <const float *>pi, <const float *>pw, <float *>pdx,
                                                <float *>pdw, <float *>pdb, rows, cols, num_threads)
    _check_status(status)


def rms_norm(cnp.ndarray x, weight, cnp.ndarray y, cnp.ndarray invrms, ptrdiff_t rows, ptrdiff_t cols,
             double eps, int num_threads):
    cdef void *px = _data(x)
    cdef void *pw = _data(weight)
    cdef void *py = _data(y)
    cdef void *pr = _data(invrms)
    cdef bint f64 = _is_float64(x)
    cdef int status
    with nogil:
        if f64:
            status = fn_rms_norm_f64(<const double *>px, <const double *>pw, <double *>py, <double *>pr,
                                     rows, cols, eps, num_threads)
        else:
            status = fn_rms_norm_f32(<const float *>px, <const float *>pw, <float *>py, <float *>pr,
                                     rows, cols, eps, num_threads)
    _check_status(status)


def rms_norm_backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray invrms, weight, cnp.ndarray dx,
                      cnp.ndarray dweight, ptrdiff_t rows, ptrdiff_t cols, int num_threads):
    cdef void *pdy = _data(dy)
    cdef void *px = _data(x)
    cdef void *pr = _data(invrms)
    cdef void *pw = _data(weight)
    cdef void *pdx = _data(dx)
    cdef void *pdw = _data(dweight)
    cdef bint f64 = _is_float64(x)
    cdef int status
    with nogil:
        if f64:
            status = fn_rms_norm_backward_f64(<const double *>pdy, <const double *>px, <const double *>pr,
                                              <const double *>pw, <double *>pdx, <double *>pdw, rows, cols,
                                              num_threads)
        else:
            status = fn_rms_norm_backward_f32(<const float *>pdy, <const float *>px, <const float *>pr,
                                              <const float *>pw, <float *>pdx, <float *>pdw, rows, cols,
                                              num_threads)
    _check_status(status)
