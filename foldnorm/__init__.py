"""foldnorm: fast CPU normalization, and an ONNX pass that folds BatchNormalization away.

foldnorm has two halves, each importable on its own:

Kernels (foldnorm.kernels, C with OpenMP on NumPy arrays)
    batch_norm, batch_norm_train, batch_norm_backward; layer_norm, rms_norm, and add_layer_norm,
    add_rms_norm (residual add fused); group_norm, instance_norm; each with its backward; batch, group and
    instance norm with an optional fused activation (relu, silu). Correct to float64 references, near the machine's memory bandwidth.
    Threads: get_num_threads, set_num_threads; build facts: build_info.
    Across processes: foldnorm.distributed synchronizes batch statistics (over MPI by default).

Folding (foldnorm.fold, pure Python on onnx and onnxruntime)
    fold_model(path_or_model) -> (folded model, FoldReport) folds frozen BatchNormalization into the
    neighbouring Conv / ConvTranspose / Gemm / MatMul and verifies the result against the original in
    onnxruntime (verify -> VerifyReport); inspect_model shows the plan. FoldError / VerificationError
    for models refused or folds that diverge. On the command line: `foldnorm fold model.onnx`.

The names below are loaded on first use, so `import foldnorm` needs neither the compiled kernels nor onnx.
"""
import importlib

from ._version import __version__

_KERNELS = ("batch_norm", "batch_norm_backward", "batch_norm_train", "layer_norm", "layer_norm_backward",
            "rms_norm", "rms_norm_backward", "add_layer_norm", "add_layer_norm_backward", "add_rms_norm",
            "add_rms_norm_backward", "group_norm", "group_norm_backward", "instance_norm",
            "instance_norm_backward", "build_info", "get_num_threads", "set_num_threads")
_FOLD = ("fold_model", "inspect_model", "verify", "FoldReport", "NodeOutcome", "VerifyReport",
         "OutputComparison", "ChannelAffine", "FoldError", "VerificationError")
_HOME = {**{name: ".kernels" for name in _KERNELS}, **{name: ".fold" for name in _FOLD}}

__all__ = list(_KERNELS + _FOLD) + ["__version__"]


_SUBMODULES = ("kernels", "fold", "distributed", "cli", "demo")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module("." + name, __name__)
    home = _HOME.get(name)
    if home is None:
        raise AttributeError("module 'foldnorm' has no attribute %r" % name)
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
