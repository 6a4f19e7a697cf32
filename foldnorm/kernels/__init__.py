"""foldnorm.kernels: normalization kernels in C with OpenMP, on NumPy arrays.

Batch normalization (inference, training forward with running-statistic update, backward), layer and
RMS normalization over one axis, group and instance normalization, each with its backward. Statistics are
centred and accumulated in float64 for float32 input; results match float64 references and do not depend
on the thread count. Threads: `num_threads=None` uses `get_num_threads()` (OMP_NUM_THREADS, else the usable
cores); `set_num_threads` changes it, and threadpoolctl can limit it from outside.  A call never uses more
threads than the usable cores, nor more than its work keeps busy (runtime.PARALLEL_GRAIN elements each);
idle threads sleep rather than spin unless OMP_WAIT_POLICY or GOMP_SPINCOUNT says otherwise (_openmp).
"""
from ._openmp import passive_wait_while_loading

# libgomp reads its wait policy once, when the first of these loads it (see _openmp).
with passive_wait_while_loading():
    from . import _batch_norm, _group_norm, _layer_norm, _runtime  # noqa: F401

from .batch_normalization import batch_norm, batch_norm_backward, batch_norm_train
from .group_normalization import group_norm, group_norm_backward, instance_norm, instance_norm_backward
from .layer_normalization import layer_norm, layer_norm_backward, rms_norm, rms_norm_backward
from .runtime import build_info, get_num_threads, set_num_threads

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_train",
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "build_info",
    "get_num_threads",
    "set_num_threads",
]
