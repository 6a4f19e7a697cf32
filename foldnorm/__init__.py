"""foldnorm: fast CPU normalization kernels, and an ONNX pass that folds BatchNormalization away."""
from .runtime import build_info, get_num_threads, set_num_threads

__version__ = "0.1.0"
