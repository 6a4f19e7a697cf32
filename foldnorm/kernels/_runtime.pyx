"""Build facts, the OpenMP thread setting, and the bandwidth-roof copy (private; see foldnorm.runtime)."""
cimport numpy as cnp

cnp.import_array()

cdef extern from "runtime.h":
    int fn_openmp_enabled()
    int fn_get_max_threads()
    void fn_set_max_threads(int n)
    void fn_parallel_copy(void *dst, const void *src, size_t nbytes, int num_threads) nogil


cdef extern from *:
    const char *FOLDNORM_COMPILER
    const char *FOLDNORM_CFLAGS


def openmp_enabled():
    return bool(fn_openmp_enabled())


def compiler():
    return FOLDNORM_COMPILER.decode()


def cflags():
    return FOLDNORM_CFLAGS.decode()


def get_max_threads():
    return fn_get_max_threads()


def set_max_threads(int n):
    fn_set_max_threads(n)


def parallel_copy(cnp.ndarray dst, cnp.ndarray src, int num_threads):
    """Copy the bytes of C-contiguous src into C-contiguous dst of the same size."""
    cdef size_t nbytes = src.nbytes
    cdef void *d = cnp.PyArray_DATA(dst)
    cdef const void *s = cnp.PyArray_DATA(src)
    with nogil:
        fn_parallel_copy(d, s, nbytes, num_threads)
