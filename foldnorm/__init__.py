"""foldnorm: fast CPU normalization kernels, and an ONNX pass that folds BatchNormalization away."""
from .batch_normalization import batch_norm, batch_norm_backward, batch_norm_train
from .errors import FoldError, VerificationError
from .fold import fold_model, inspect_model
from .group_normalization import group_norm, group_norm_backward, instance_norm, instance_norm_backward
from .layer_normalization import layer_norm, layer_norm_backward, rms_norm, rms_norm_backward
from .runtime import build_info, get_num_threads, set_num_threads
from .verification import VerifyReport, verify

__version__ = "0.1.0"

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
    "fold_model",
    "inspect_model",
    "verify",
    "VerifyReport",
    "FoldError",
    "VerificationError",
    "build_info",
    "get_num_threads",
    "set_num_threads",
]
