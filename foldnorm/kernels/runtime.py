"""Build facts and the thread setting shared by every kernel.

The thread count lives in one place, OpenMP's own setting (the `nthreads-var` ICV): OMP_NUM_THREADS sets
it, `set_num_threads` sets it, and threadpoolctl's `threadpool_limits` changes and restores it. A kernel
called with `num_threads=None` uses it; an explicit `num_threads` overrides it for that call.

Whatever is asked for, a call never runs more threads than the usable cores (the CPUs this process may run
on), nor more than its work can keep busy: one thread per PARALLEL_GRAIN elements, so a small call runs
on the calling thread alone and opens no parallel region.  Neither cap changes a result: every kernel's
output is bit-identical for any thread count.
"""
import operator
import os
import reprlib

from . import _runtime

# Elements of work per thread below which another thread costs more than it saves: each parallel region
# pays for waking or joining its team (microseconds on a quiet machine, up to a scheduler time slice on a
# busy one).  A thread normalizes this many float32 values in about 0.1 ms, enough to pay for it; the
# benchmarks README gives the measurements.
PARALLEL_GRAIN = 1 << 17


def build_info():
    """How the compiled kernels were built.

    Returns
    -------
    dict
        `openmp` (bool: kernels run in parallel), `max_threads` (int: what a kernel with num_threads=None
        uses at most now), `usable_cores` (int), `threads` (str: what runs the parallel work),
        `vector_paths` (str: the vector versions of the loops this build has), `vector_path` (str: the one
        this CPU runs), `compiler` and `cflags` (str).
    """
    return {
        "openmp": _runtime.openmp_enabled(),
        "max_threads": get_num_threads(),
        "usable_cores": usable_cores(),
        "threads": "foldnorm's thread team (caller + pool workers)" if _runtime.openmp_enabled() else "one",
        "vector_paths": _runtime.vector_paths(),
        "vector_path": _runtime.vector_path(),
        "compiler": _runtime.compiler(),
        "cflags": _runtime.cflags(),
    }


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def get_num_threads() -> int:
    """The most threads a kernel called with num_threads=None uses.

    The OpenMP setting (OMP_NUM_THREADS, `set_num_threads`, threadpoolctl), capped to the usable cores.
    """
    return min(_runtime.get_max_threads(), usable_cores())


def set_num_threads(n: int) -> None:
    """Set the threads kernels use by default (the OpenMP setting; threadpoolctl can still limit it).

    Parameters
    ----------
    n : int
        A positive int (NumPy integers too).  A count above the usable cores is capped to them: more
        threads than cores only wait for each other.

    Raises
    ------
    TypeError
        n is not an int (a bool, a float, a string ...).
    ValueError
        n is less than 1.
    """
    _runtime.set_max_threads(min(_positive_int(n, "n"), usable_cores()))


def resolve_num_threads(num_threads, work=None) -> int:
    """The thread count a kernel call runs with.

    Parameters
    ----------
    num_threads : int or None
        The caller's request: a positive int, or None for `get_num_threads()`.
    work : int, optional
        The number of elements the call processes; at most one thread per PARALLEL_GRAIN of them is used.

    Returns
    -------
    int
        At least 1, at most the request, the usable cores and work // PARALLEL_GRAIN.
    """
    threads = _runtime.get_max_threads() if num_threads is None else _positive_int(num_threads, "num_threads")
    if work is not None:
        threads = min(threads, max(1, work // PARALLEL_GRAIN))
    # The affinity mask is asked for only when the call could use a team: small calls skip the system call.
    return threads if threads == 1 else min(threads, usable_cores())


def _positive_int(value, name):
    expected = "%s must be a positive int" % name
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise TypeError("%s, got %s" % (expected, reprlib.repr(value))) from None
    if n < 1:
        raise ValueError("%s, got %s" % (expected, reprlib.repr(n)))
    return n
