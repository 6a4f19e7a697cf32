"""Batch normalization kernels (private; see foldnorm.batch_normalization, which checks every argument).

Arrays arrive flattened and C-contiguous: x, y, dy and dx in the compute dtype (float32 or float64),
per-channel parameters and statistics in float64; weight and bias may be None.
"""

cdef extern from "batch_norm.h":
    int FN_BN_OK
    int fn_batch_norm_f32(const float *x, float *y, Py_ssize_t outer, Py_ssize_t channels,
                          Py_ssize_t inner, const double *mean, const double *var, const double *weight,
                          const double *bias, double eps, int num_threads) nogil
    int fn_batch_norm_f64(const double *x, double *y, Py_ssize_t outer, Py_ssize_t channels,
                          Py_ssize_t inner, const double *mean, const double *var, const double *weight,
                          const double *bias, double eps, int num_threads) nogil
    int fn_batch_norm_train_f32(const float *x, float *y, Py_ssize_t outer, Py_ssize_t channels,
                                Py_ssize_t inner, const double *weight, const double *bias, double eps,
                                double *mean, double *var, double *invstd, int num_threads) nogil
    int fn_batch_norm_train_f64(const double *x, double *y, Py_ssize_t outer, Py_ssize_t channels,
                                Py_ssize_t inner, const double *weight, const double *bias, double eps,
                                double *mean, double *var, double *invstd, int num_threads) nogil
    int fn_batch_norm_backward_f32(const float *dy, const float *x, float *dx, Py_ssize_t outer,
                                   Py_ssize_t channels, Py_ssize_t inner, const double *mean,
                                   const double *invstd, const double *weight, double *dweight,
                                   double *dbias, int num_threads) nogil
    int fn_batch_norm_backward_f64(const double *dy, const double *x, double *dx, Py_ssize_t outer,
                                   Py_ssize_t channels, Py_ssize_t inner, const double *mean,
                                   const double *invstd, const double *weight, double *dweight,
                                   double *dbias, int num_threads) nogil


ctypedef fused real:
    float
    double


cdef inline const double *_optional(const double[::1] p) noexcept:
    if p is None:
        return NULL
    return &p[0]


cdef inline int _check(int status) except -1:
    if status != FN_BN_OK:
        raise MemoryError("foldnorm: out of memory for batch normalization scratch space")
    return 0


def batch_norm(const real[::1] x, real[::1] y, Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,
               const double[::1] mean, const double[::1] var, const double[::1] weight,
               const double[::1] bias, double eps, int num_threads):
    cdef const double *w = _optional(weight)
    cdef const double *b = _optional(bias)
    cdef int status
    with nogil:
        if real is float:
            status = fn_batch_norm_f32(&x[0], &y[0], outer, channels, inner, &mean[0], &var[0], w, b,
                                       eps, num_threads)
        else:
            status = fn_batch_norm_f64(&x[0], &y[0], outer, channels, inner, &mean[0], &var[0], w, b,
                                       eps, num_threads)
    _check(status)


def batch_norm_train(const real[::1] x, real[::1] y, Py_ssize_t outer, Py_ssize_t channels,
                     Py_ssize_t inner, const double[::1] weight, const double[::1] bias, double eps,
                     double[::1] mean, double[::1] var, double[::1] invstd, int num_threads):
    cdef const double *w = _optional(weight)
    cdef const double *b = _optional(bias)
    cdef int status
    with nogil:
        if real is float:
            status = fn_batch_norm_train_f32(&x[0], &y[0], outer, channels, inner, w, b, eps, &mean[0],
                                             &var[0], &invstd[0], num_threads)
        else:
            status = fn_batch_norm_train_f64(&x[0], &y[0], outer, channels, inner, w, b, eps, &mean[0],
                                             &var[0], &invstd[0], num_threads)
    _check(status)


def batch_norm_backward(const real[::1] dy, const real[::1] x, real[::1] dx, Py_ssize_t outer,
                        Py_ssize_t channels, Py_ssize_t inner, const double[::1] mean,
                        const double[::1] invstd, const double[::1] weight, double[::1] dweight,
                        double[::1] dbias, int num_threads):
    cdef const double *w = _optional(weight)
    cdef int status
    with nogil:
        if real is float:
            status = fn_batch_norm_backward_f32(&dy[0], &x[0], &dx[0], outer, channels, inner, &mean[0],
                                                &invstd[0], w, &dweight[0], &dbias[0], num_threads)
        else:
            status = fn_batch_norm_backward_f64(&dy[0], &x[0], &dx[0], outer, channels, inner, &mean[0],
                                                &invstd[0], w, &dweight[0], &dbias[0], num_threads)
    _check(status)
