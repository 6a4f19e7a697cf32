"""Build facts and the thread setting shared by every kernel.

The thread count lives in one place, OpenMP's own setting (the `nthreads-var` ICV): OMP_NUM_THREADS sets
it, `set_num_threads` sets it, and threadpoolctl's `threadpool_limits` changes and restores it. A kernel
called with `num_threads=None` uses it; an explicit `num_threads` overrides it for that call.
"""
import operator

from . import _runtime


def build_info():
    """How the compiled kernels were built.

    Returns a dict with `openmp` (bool: kernels run in parallel), `max_threads` (int: what a kernel with
    num_threads=None uses now), `compiler` and `cflags` (str).
    """
    return {
        "openmp": _runtime.openmp_enabled(),
        "max_threads": get_num_threads(),
        "compiler": _runtime.compiler(),
        "cflags": _runtime.cflags(),
    }


def get_num_threads():
    """Threads a kernel uses when called with num_threads=None."""
    return _runtime.get_max_threads()


def set_num_threads(n):
    """Set the threads kernels use by default (the OpenMP setting; threadpoolctl can still limit it)."""
    n = _positive_int(n, "n")
    _runtime.set_max_threads(n)


def resolve_num_threads(num_threads):
    """The int thread count for a kernel call: num_threads itself, or the global setting for None."""
    if num_threads is None:
        return get_num_threads()
    return _positive_int(num_threads, "num_threads")


def _positive_int(value, name):
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError("%s must be a positive int, got %r" % (name, value)) from None
    if n < 1:
        raise ValueError("%s must be a positive int, got %d" % (name, n))
    return n
