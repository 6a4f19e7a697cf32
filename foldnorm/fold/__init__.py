"""foldnorm.fold: fold frozen BatchNormalization into the neighbouring layers of an ONNX model.

Every inference-mode BatchNormalization, and every per-channel Mul/Add/Sub/Div by a constant, is read as
one per-channel affine map (`ChannelAffine`) and moved into the weights of a Conv, ConvTranspose, Gemm or
MatMul next to it: backward into the layer that produces its input, forward into the layer that reads its
output, or across an Add/Sum/Concat of several layers. What cannot fold becomes one Mul and one Add. The
result is checked against the original model in onnxruntime (`verify`).

The pieces, in the order a model meets them: modelio (read, check, write), driver (the loop), sites (the
maps), layers (the absorbers, one per layer kind), rules (condition and apply), absorb (the arithmetic),
graph_index / constants / proto (the graph), verification and report (the proof and the account).
"""
from .core.affine import ChannelAffine
from .api import fold_model, inspect_model
from .errors import FoldError, VerificationError
from .report import FoldReport, NodeOutcome
from .verification import OutputComparison, VerifyReport, verify

__all__ = [
    "fold_model",
    "inspect_model",
    "verify",
    "FoldReport",
    "NodeOutcome",
    "VerifyReport",
    "OutputComparison",
    "ChannelAffine",
    "FoldError",
    "VerificationError",
]
