"""Memory for the large results of every kernel (y, dx), recycled once the caller has let go of them.

The public kernel functions allocate their large outputs with `empty_result`; the small per-channel or
per-row statistics stay plain np.empty arrays.
"""
import collections
import ctypes
import math
import threading
import weakref

import numpy as np


class _OutputCache:
    """Memory for large results, recycled once the caller has let go of them.

    The first touch of a fresh multi-MiB array costs a page fault per page, which for a 32 MiB result
    takes as long as normalizing it.  A result of at least MIN_BYTES is therefore a view of a cached
    slab through a ctypes "lease": every array or view of the result keeps the lease alive (it is the
    result's .base), and when the last one is gone a weakref finalizer returns the slab.  So a result
    is a fresh, writable, C-contiguous array that the caller owns for as long as it holds any view of
    it.  At most MAX_SLABS idle slabs (MAX_BYTES in all) are kept, the oldest dropped first.  Any
    thread may allocate or release.
    """

    MIN_BYTES = 4 << 20
    MAX_SLABS = 4
    MAX_BYTES = 256 << 20

    def __init__(self):
        self._idle = collections.OrderedDict()  # id(slab) -> slab, oldest first
        # Reentrant: a finalizer run by the garbage collector may give a slab back while this thread
        # holds the lock.
        self._lock = threading.RLock()

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.MIN_BYTES:
            return np.empty(shape, dtype)
        slab = self._take(nbytes)
        lease = (ctypes.c_char * nbytes).from_buffer(slab)
        weakref.finalize(lease, self._give_back, slab).atexit = False
        return np.frombuffer(lease, dtype).reshape(shape)

    def _take(self, nbytes):
        with self._lock:
            for key, slab in self._idle.items():
                if slab.nbytes == nbytes:
                    del self._idle[key]
                    return slab
        return np.empty(nbytes, np.uint8)

    def _give_back(self, slab):
        with self._lock:
            self._idle[id(slab)] = slab
            while len(self._idle) > self.MAX_SLABS or sum(s.nbytes for s in self._idle.values()) > self.MAX_BYTES:
                self._idle.popitem(last=False)


_OUTPUTS = _OutputCache()


def empty_result(shape, dtype):
    """An uninitialized C-contiguous array for a kernel's result, from recycled memory when large."""
    return _OUTPUTS.empty(tuple(shape), dtype)
