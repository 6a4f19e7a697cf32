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


# A typed ndarray argument also accepts None (weight, bias).  Reading an array's data pointer needs no GIL
# (numpy declares PyArray_DATA nogil), so each wrapper takes its pointers inside its nogil block.

cdef inline float *_f32(cnp.ndarray a) noexcept nogil:
    """The float32 data of a, or NULL for None."""
    return NULL if a is None else <float *>cnp.PyArray_DATA(a)


cdef inline double *_f64(cnp.ndarray a) noexcept nogil:
    """The float64 data of a, or NULL for None."""
    return NULL if a is None else <double *>cnp.PyArray_DATA(a)


cdef inline bint _is_float64(cnp.ndarray a) noexcept nogil:
    return cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64


cdef inline _check_status(int status):
    if status != 0:
        raise MemoryError("foldnorm: could not allocate the kernel's scratch memory")


def layer_norm(cnp.ndarray x, cnp.ndarray weight, cnp.ndarray bias, cnp.ndarray y, cnp.ndarray mean,
               cnp.ndarray invstd, ptrdiff_t rows, ptrdiff_t cols, double eps, int num_threads):
    cdef int status
    with nogil:
        if _is_float64(x):
            status = fn_layer_norm_f64(_f64(x), _f64(weight), _f64(bias), _f64(y), _f64(mean), _f64(invstd),
                                       rows, cols, eps, num_threads)
        else:
            status = fn_layer_norm_f32(_f32(x), _f32(weight), _f32(bias), _f32(y), _f32(mean), _f32(invstd),
                                       rows, cols, eps, num_threads)
    _check_status(status)


def layer_norm_backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray mean, cnp.ndarray invstd,
                        cnp.ndarray weight, cnp.ndarray dx, cnp.ndarray dweight, cnp.ndarray dbias,
                        ptrdiff_t rows, ptrdiff_t cols, int num_threads):
    cdef int status
    with nogil:
        if _is_float64(x):
            status = fn_layer_norm_backward_f64(_f64(dy), _f64(x), _f64(mean), _f64(invstd), _f64(weight),
                                                _f64(dx), _f64(dweight), _f64(dbias), rows, cols, num_threads)
        else:
            status = fn_layer_norm_backward_f32(_f32(dy), _f32(x), _f32(mean), _f32(invstd), _f32(weight),
                                                _f32(dx), _f32(dweight), _f32(dbias), rows, cols, num_threads)
    _check_status(status)


def rms_norm(cnp.ndarray x, cnp.ndarray weight, cnp.ndarray y, cnp.ndarray invrms, ptrdiff_t rows,
             ptrdiff_t cols, double eps, int num_threads):
    cdef int status
    with nogil:
        if _is_float64(x):
            status = fn_rms_norm_f64(_f64(x), _f64(weight), _f64(y), _f64(invrms), rows, cols, eps,
                                     num_threads)
        else:
            status = fn_rms_norm_f32(_f32(x), _f32(weight), _f32(y), _f32(invrms), rows, cols, eps,
                                     num_threads)
    _check_status(status)


def rms_norm_backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray invrms, cnp.ndarray weight, cnp.ndarray dx,
                      cnp.ndarray dweight, ptrdiff_t rows, ptrdiff_t cols, int num_threads):
    cdef int status
    with nogil:
        if _is_float64(x):
            status = fn_rms_norm_backward_f64(_f64(dy), _f64(x), _f64(invrms), _f64(weight), _f64(dx),
                                              _f64(dweight), rows, cols, num_threads)
        else:
            status = fn_rms_norm_backward_f32(_f32(dy), _f32(x), _f32(invrms), _f32(weight), _f32(dx),
                                              _f32(dweight), rows, cols, num_threads)
    _check_status(status)
