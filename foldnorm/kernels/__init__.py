"""foldnorm.kernels: normalization kernels in C, on NumPy arrays, run by foldnorm's own thread team.

Batch normalization (inference, training forward with running-statistic update, backward), layer and
RMS normalization over one axis (and their residual variants add_layer_norm, add_rms_norm: s = x + residual
normalized in the same pass), group and instance normalization, each with its backward.  Batch, group and
instance normalization take an activation ("relu" or "silu") applied in the same pass, and their backward
passes its gradient, recomputing the pre-activation from x. Statistics are
centred and accumulated in float64 for float32 input; results match float64 references and do not depend
on the thread count. Threads: `num_threads=None` uses `get_num_threads()` (OMP_NUM_THREADS, else the usable
cores); `set_num_threads` changes it, and threadpoolctl can limit it from outside.  A call never uses more
threads than the usable cores, nor more than its work keeps busy (runtime.PARALLEL_GRAIN elements each).
The thread count is OpenMP's setting; the work runs on foldnorm's team, where the caller works too and never
waits for a worker the operating system has not scheduled, and idle workers spin for the next call only
while the machine has a core for every runnable thread (briefly when it has not), then sleep (the OpenMP
wait policy does not apply to them).
"""
from .batch_normalization import batch_norm, batch_norm_backward, batch_norm_train
from .group_normalization import group_norm, group_norm_backward, instance_norm, instance_norm_backward
from .layer_normalization import layer_norm, layer_norm_backward, rms_norm, rms_norm_backward
from .residual_normalization import add_layer_norm, add_layer_norm_backward, add_rms_norm, add_rms_norm_backward
from .runtime import build_info, get_num_threads, set_num_threads

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_train",
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "add_layer_norm",
    "add_layer_norm_backward",
    "add_rms_norm",
    "add_rms_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "build_info",
    "get_num_threads",
    "set_num_threads",
]
