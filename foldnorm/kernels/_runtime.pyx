"""Build facts, the OpenMP thread setting, the bandwidth-roof copy (private; see
foldnorm.kernels.runtime), and the activations' building blocks on their own (for the tests)."""
cimport numpy as cnp

from foldnorm.kernels._kernels cimport (
    FOLDNORM_CFLAGS,
    FOLDNORM_COMPILER,
    element_type,
    fn_activate_values_f32,
    fn_activate_values_f64,
    fn_activation,
    fn_activation_grad_values_f32,
    fn_activation_grad_values_f64,
    fn_exp_values_f32,
    fn_exp_values_f64,
    fn_get_max_threads,
    fn_openmp_enabled,
    fn_vector_path,
    fn_vector_paths,
    fn_parallel_copy,
    fn_pool_attach,
    fn_pool_hold_workers,
    fn_pool_run,
    fn_pool_set_spin,
    fn_pool_stats,
    fn_set_max_threads,
    fn_team_runner,
    FN_POOL_STAT_COUNT,
    tensor,
)
from cpython.pycapsule cimport PyCapsule_New

cnp.import_array()
fn_pool_attach(<fn_team_runner>fn_pool_run)


def pool_capsule():
    """The pool's entry point, for the other kernel modules to run their regions on (see _kernels.pxd)."""
    return PyCapsule_New(<void *>fn_pool_run, b"foldnorm.pool", NULL)


def pool_stats():
    """The pool's counters since the process started (see src_c/pool.h)."""
    cdef long long out[FN_POOL_STAT_COUNT]
    fn_pool_stats(out)
    names = ("team_regions", "busy_regions", "caller_units", "worker_units", "workers_started", "solo_regions",
             "preempted_waits", "spins_ended_busy", "spins_to_idle_limit")
    return {name: out[k] for k, name in enumerate(names)}


def hold_workers(bint held):
    """For tests: while held, no worker joins a region, as if none were ever scheduled."""
    fn_pool_hold_workers(held)


def openmp_enabled():
    """Whether the kernels were built with OpenMP."""
    return bool(fn_openmp_enabled())


def vector_paths():
    """The vector versions of the kernels' loops this build has, comma-separated."""
    return fn_vector_paths().decode()


def vector_path():
    """The vector version that runs on this CPU."""
    return fn_vector_path().decode()


def compiler():
    """The C compiler the kernels were built with."""
    return FOLDNORM_COMPILER.decode()


def cflags():
    """The C compiler flags the kernels were built with."""
    return FOLDNORM_CFLAGS.decode()


def get_max_threads():
    """OpenMP's default thread count (1 without OpenMP)."""
    return fn_get_max_threads()


def set_max_threads(int n):
    """Set OpenMP's default thread count (nothing without OpenMP)."""
    fn_set_max_threads(n)


def parallel_copy(cnp.ndarray dst not None, cnp.ndarray src not None, int num_threads):
    """Copy the bytes of C-contiguous src into C-contiguous dst of the same size."""
    if not (cnp.PyArray_IS_C_CONTIGUOUS(src) and cnp.PyArray_IS_C_CONTIGUOUS(dst)) or dst.nbytes < src.nbytes:
        raise ValueError("parallel_copy needs C-contiguous arrays, dst at least as large as src")
    cdef size_t nbytes = src.nbytes
    cdef void *d = cnp.PyArray_DATA(dst)
    cdef const void *s = cnp.PyArray_DATA(src)
    with nogil:
        fn_parallel_copy(d, s, nbytes, num_threads)


def set_spin(long long nanoseconds, idle_nanoseconds=None):
    """For benchmarks: how long idle workers spin before they sleep, at most `nanoseconds`, or at most
    `idle_nanoseconds` while the machine has a core for every runnable thread (None: `nanoseconds` whatever
    the machine does; 0 and 0: they sleep at once).  The defaults are 50,000 and 20,000,000."""
    fn_pool_set_spin(nanoseconds, nanoseconds if idle_nanoseconds is None else idle_nanoseconds)


def exp_values(cnp.ndarray x not None, cnp.ndarray y not None):
    """y = exp(x) by the kernels' vector exp (x and y C-contiguous, one float dtype, one size)."""
    cdef int t = element_type(x)
    cdef void *xp = tensor(x, t)
    cdef void *yp = tensor(y, t)
    cdef Py_ssize_t n = x.size
    with nogil:
        if t == cnp.NPY_FLOAT32:
            fn_exp_values_f32(<const float *>xp, <float *>yp, n)
        else:
            fn_exp_values_f64(<const double *>xp, <double *>yp, n)


def activate_values(cnp.ndarray x not None, cnp.ndarray y not None, int activation):
    """y = act(x) as the kernels apply it (activation: the C enum's value)."""
    cdef int t = element_type(x)
    cdef void *xp = tensor(x, t)
    cdef void *yp = tensor(y, t)
    cdef Py_ssize_t n = x.size
    with nogil:
        if t == cnp.NPY_FLOAT32:
            fn_activate_values_f32(<const float *>xp, <float *>yp, n, <fn_activation>activation)
        else:
            fn_activate_values_f64(<const double *>xp, <double *>yp, n, <fn_activation>activation)


def activation_grad_values(cnp.ndarray dy not None, cnp.ndarray x not None, cnp.ndarray g not None,
                           int activation):
    """g = dy * act'(x) as the kernels' backward passes take it."""
    cdef int t = element_type(x)
    cdef void *dyp = tensor(dy, t)
    cdef void *xp = tensor(x, t)
    cdef void *gp = tensor(g, t)
    cdef Py_ssize_t n = x.size
    with nogil:
        if t == cnp.NPY_FLOAT32:
            fn_activation_grad_values_f32(<const float *>dyp, <const float *>xp, <float *>gp, n,
                                          <fn_activation>activation)
        else:
            fn_activation_grad_values_f64(<const double *>dyp, <const double *>xp, <double *>gp, n,
                                          <fn_activation>activation)
