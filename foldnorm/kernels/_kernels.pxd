"""The C declarations of foldnorm's kernels (src_c/) and the helpers every private wrapper module uses.

Each _*.pyx module cimports what it needs from here and declares no C function of its own.  Every wrapper
is written the same way: the element type from x, each array's data pointer through the helpers below
(which check its dtype and layout), the C call with the GIL released, then check() of its status.  The
conventions of the C entry points (argument order, float64 parameters and statistics, fn_status) are
src_c/fn_api.h's.
"""
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stddef cimport ptrdiff_t


cdef extern from "fn_api.h" nogil:
    ctypedef enum fn_status:
        FN_OK
        FN_NOMEM
    ctypedef enum fn_activation:
        FN_ACT_NONE
        FN_ACT_RELU
        FN_ACT_SILU


cdef extern from "batch_norm.h" nogil:
    fn_status fn_batch_norm_f32(const float *x, float *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                                const double *mean, const double *var, const double *weight, const double *bias,
                                double eps, fn_activation activation, int num_threads)
    fn_status fn_batch_norm_f64(const double *x, double *y, ptrdiff_t outer, ptrdiff_t channels,
                                ptrdiff_t inner, const double *mean, const double *var, const double *weight,
                                const double *bias, double eps, fn_activation activation, int num_threads)
    fn_status fn_batch_norm_train_f32(const float *x, float *y, ptrdiff_t outer, ptrdiff_t channels,
                                      ptrdiff_t inner, const double *weight, const double *bias, double eps,
                                      fn_activation activation, double *mean, double *var, double *invstd,
                                      int num_threads)
    fn_status fn_batch_norm_train_f64(const double *x, double *y, ptrdiff_t outer, ptrdiff_t channels,
                                      ptrdiff_t inner, const double *weight, const double *bias, double eps,
                                      fn_activation activation, double *mean, double *var, double *invstd,
                                      int num_threads)
    fn_status fn_batch_norm_backward_f32(const float *dy, const float *x, float *dx, ptrdiff_t outer,
                                         ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                                         const double *invstd, const double *weight, const double *bias,
                                         fn_activation activation, double *dweight, double *dbias,
                                         int num_threads)
    fn_status fn_batch_norm_backward_f64(const double *dy, const double *x, double *dx, ptrdiff_t outer,
                                         ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                                         const double *invstd, const double *weight, const double *bias,
                                         fn_activation activation, double *dweight, double *dbias,
                                         int num_threads)


cdef extern from "group_norm.h" nogil:
    fn_status fn_group_norm_f32(const float *x, float *y, ptrdiff_t batch, ptrdiff_t channels, ptrdiff_t spatial,
                                ptrdiff_t groups, const double *weight, const double *bias, double eps,
                                fn_activation activation, double *mean, double *invstd, int num_threads)
    fn_status fn_group_norm_f64(const double *x, double *y, ptrdiff_t batch, ptrdiff_t channels,
                                ptrdiff_t spatial, ptrdiff_t groups, const double *weight, const double *bias,
                                double eps, fn_activation activation, double *mean, double *invstd,
                                int num_threads)
    fn_status fn_group_norm_backward_f32(const float *dy, const float *x, float *dx, ptrdiff_t batch,
                                         ptrdiff_t channels, ptrdiff_t spatial, ptrdiff_t groups,
                                         const double *mean, const double *invstd, const double *weight,
                                         const double *bias, fn_activation activation, double *dweight,
                                         double *dbias, int num_threads)
    fn_status fn_group_norm_backward_f64(const double *dy, const double *x, double *dx, ptrdiff_t batch,
                                         ptrdiff_t channels, ptrdiff_t spatial, ptrdiff_t groups,
                                         const double *mean, const double *invstd, const double *weight,
                                         const double *bias, fn_activation activation, double *dweight,
                                         double *dbias, int num_threads)


cdef extern from "layer_norm.h" nogil:
    fn_status fn_layer_norm_f32(const float *x, float *y, ptrdiff_t rows, ptrdiff_t cols, const double *weight,
                                const double *bias, double eps, double *mean, double *invstd, int num_threads)
    fn_status fn_layer_norm_f64(const double *x, double *y, ptrdiff_t rows, ptrdiff_t cols,
                                const double *weight, const double *bias, double eps, double *mean,
                                double *invstd, int num_threads)
    fn_status fn_layer_norm_backward_f32(const float *dy, const float *x, float *dx, ptrdiff_t rows,
                                         ptrdiff_t cols, const double *mean, const double *invstd,
                                         const double *weight, double *dweight, double *dbias, int num_threads)
    fn_status fn_layer_norm_backward_f64(const double *dy, const double *x, double *dx, ptrdiff_t rows,
                                         ptrdiff_t cols, const double *mean, const double *invstd,
                                         const double *weight, double *dweight, double *dbias, int num_threads)
    fn_status fn_rms_norm_f32(const float *x, float *y, ptrdiff_t rows, ptrdiff_t cols, const double *weight,
                              double eps, double *invrms, int num_threads)
    fn_status fn_rms_norm_f64(const double *x, double *y, ptrdiff_t rows, ptrdiff_t cols, const double *weight,
                              double eps, double *invrms, int num_threads)
    fn_status fn_rms_norm_backward_f32(const float *dy, const float *x, float *dx, ptrdiff_t rows,
                                       ptrdiff_t cols, const double *invrms, const double *weight,
                                       double *dweight, int num_threads)
    fn_status fn_rms_norm_backward_f64(const double *dy, const double *x, double *dx, ptrdiff_t rows,
                                       ptrdiff_t cols, const double *invrms, const double *weight,
                                       double *dweight, int num_threads)
    fn_status fn_add_layer_norm_f32(const float *x, const float *residual, float *y, float *s, ptrdiff_t rows,
                                    ptrdiff_t cols, const double *weight, const double *bias, double eps,
                                    double *mean, double *invstd, int num_threads)
    fn_status fn_add_layer_norm_f64(const double *x, const double *residual, double *y, double *s,
                                    ptrdiff_t rows, ptrdiff_t cols, const double *weight, const double *bias,
                                    double eps, double *mean, double *invstd, int num_threads)
    fn_status fn_add_rms_norm_f32(const float *x, const float *residual, float *y, float *s, ptrdiff_t rows,
                                  ptrdiff_t cols, const double *weight, double eps, double *invrms,
                                  int num_threads)
    fn_status fn_add_rms_norm_f64(const double *x, const double *residual, double *y, double *s, ptrdiff_t rows,
                                  ptrdiff_t cols, const double *weight, double eps, double *invrms,
                                  int num_threads)
    fn_status fn_add_layer_norm_backward_f32(const float *dy, const float *ds, const float *s, float *dx,
                                             ptrdiff_t rows, ptrdiff_t cols, const double *mean,
                                             const double *invstd, const double *weight, double *dweight,
                                             double *dbias, int num_threads)
    fn_status fn_add_layer_norm_backward_f64(const double *dy, const double *ds, const double *s, double *dx,
                                             ptrdiff_t rows, ptrdiff_t cols, const double *mean,
                                             const double *invstd, const double *weight, double *dweight,
                                             double *dbias, int num_threads)
    fn_status fn_add_rms_norm_backward_f32(const float *dy, const float *ds, const float *s, float *dx,
                                           ptrdiff_t rows, ptrdiff_t cols, const double *invrms,
                                           const double *weight, double *dweight, int num_threads)
    fn_status fn_add_rms_norm_backward_f64(const double *dy, const double *ds, const double *s, double *dx,
                                           ptrdiff_t rows, ptrdiff_t cols, const double *invrms,
                                           const double *weight, double *dweight, int num_threads)



cdef extern from "bn_blocks.h" nogil:
    fn_status fn_bn_stats_f32(const float *x, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner, double *row,
                              int num_threads)
    fn_status fn_bn_stats_f64(const double *x, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                              double *row, int num_threads)
    void fn_bn_merge_stats(ptrdiff_t parts, ptrdiff_t channels, const double *rows, double *count, double *mean,
                           double *m2)
    void fn_bn_update_running(ptrdiff_t channels, double count, const double *mean, const double *m2,
                              double momentum, double *running_mean, double *running_var)
    fn_status fn_bn_elemt_f32(const float *x, float *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                              const double *mean, const double *invstd, const double *weight, const double *bias,
                              int num_threads)
    fn_status fn_bn_elemt_f64(const double *x, double *y, ptrdiff_t outer, ptrdiff_t channels, ptrdiff_t inner,
                              const double *mean, const double *invstd, const double *weight,
                              const double *bias, int num_threads)
    fn_status fn_bn_backward_reduce_f32(const float *dy, const float *x, ptrdiff_t outer, ptrdiff_t channels,
                                        ptrdiff_t inner, const double *mean, const double *invstd, double *row,
                                        int num_threads)
    fn_status fn_bn_backward_reduce_f64(const double *dy, const double *x, ptrdiff_t outer, ptrdiff_t channels,
                                        ptrdiff_t inner, const double *mean, const double *invstd, double *row,
                                        int num_threads)
    void fn_bn_merge_grad_sums(ptrdiff_t parts, ptrdiff_t channels, const double *rows, double *count,
                               double *sum_dy, double *sum_dy_xmu)
    fn_status fn_bn_backward_elemt_f32(const float *dy, const float *x, float *dx, ptrdiff_t outer,
                                       ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                                       const double *invstd, const double *sum_dy, const double *sum_dy_xmu,
                                       double count, const double *weight, int num_threads)
    fn_status fn_bn_backward_elemt_f64(const double *dy, const double *x, double *dx, ptrdiff_t outer,
                                       ptrdiff_t channels, ptrdiff_t inner, const double *mean,
                                       const double *invstd, const double *sum_dy, const double *sum_dy_xmu,
                                       double count, const double *weight, int num_threads)


cdef extern from "runtime.h" nogil:
    int fn_openmp_enabled()
    const char *fn_vector_paths()
    const char *fn_vector_path()
    int fn_get_max_threads()
    void fn_set_max_threads(int n)
    void fn_parallel_copy(void *dst, const void *src, size_t nbytes, int num_threads)
    void fn_exp_values_f32(const float *x, float *y, ptrdiff_t n)
    void fn_exp_values_f64(const double *x, double *y, ptrdiff_t n)
    void fn_activate_values_f32(const float *x, float *y, ptrdiff_t n, fn_activation act)
    void fn_activate_values_f64(const double *x, double *y, ptrdiff_t n, fn_activation act)
    void fn_activation_grad_values_f32(const float *dy, const float *x, float *g, ptrdiff_t n, fn_activation act)
    void fn_activation_grad_values_f64(const double *dy, const double *x, double *g, ptrdiff_t n,
                                       fn_activation act)


cdef extern from "fn_pool.h" nogil:
    ctypedef void (*fn_team_runner)(int num_threads, void *region, void *arg)
    void fn_pool_attach(fn_team_runner runner)


cdef extern from "pool.h" nogil:
    enum: FN_POOL_STAT_COUNT
    void fn_pool_run(int num_threads, void *region, void *arg)
    void fn_pool_stats(long long *out)
    void fn_pool_hold_workers(int held)
    void fn_pool_set_spin(long long ns, long long idle_ns)


cdef inline int attach_pool() except -1:
    """Run this module's parallel regions on the process's one pool, foldnorm.kernels._runtime's."""
    from foldnorm.kernels import _runtime
    fn_pool_attach(<fn_team_runner>PyCapsule_GetPointer(_runtime.pool_capsule(), b"foldnorm.pool"))
    return 0


# The compiler and flags the extensions were built with: macros that setup.py defines.
cdef extern from *:
    const char *FOLDNORM_COMPILER
    const char *FOLDNORM_CFLAGS


cdef inline int element_type(cnp.ndarray x) except -1:
    """NPY_FLOAT32 or NPY_FLOAT64: the element type of a call's tensors, taken from x."""
    cdef int typenum = cnp.PyArray_TYPE(x)
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        raise TypeError("foldnorm: the kernels take float32 or float64 tensors, got %s" % x.dtype)
    return typenum


cdef inline void *tensor(cnp.ndarray a, int typenum) except NULL:
    """The data of a tensor (x, y, dy, dx): a C-contiguous array of the call's element type."""
    if cnp.PyArray_TYPE(a) != typenum or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise TypeError("foldnorm: expected a C-contiguous %s tensor, got a %s array"
                        % ("float32" if typenum == cnp.NPY_FLOAT32 else "float64", a.dtype))
    return cnp.PyArray_DATA(a)


cdef inline double *values(cnp.ndarray a) except NULL:
    """The data of a parameter, statistic or gradient array: C-contiguous float64."""
    if cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT64 or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise TypeError("foldnorm: expected a C-contiguous float64 array, got a %s array" % a.dtype)
    return <double *>cnp.PyArray_DATA(a)


cdef inline double *optional_values(cnp.ndarray a) except? NULL:
    """values(a), or NULL for None (a weight or bias that is not given)."""
    if a is None:
        return NULL
    return values(a)


cdef inline int check(fn_status status, str kernel) except -1:
    """Raise MemoryError when a kernel could not allocate its scratch memory."""
    if status == FN_NOMEM:
        raise MemoryError("foldnorm: out of memory for the scratch space of %s" % kernel)
    return 0
