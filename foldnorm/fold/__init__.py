"""foldnorm.fold: fold frozen BatchNormalization into the neighbouring layers of an ONNX model.

Every inference-mode BatchNormalization, and every per-channel Mul/Add/Sub/Div by a constant, is read as
one per-channel affine map (`ChannelAffine`) and moved into the weights of a Conv, ConvTranspose, Gemm or
MatMul next to it: backward into the layer that produces its input, forward into the layer that reads its
output, or across an Add/Sum/Concat of several layers. What cannot fold becomes one Mul and one Add. The
result is checked against the original model in onnxruntime (`verify`).

`ModelSession` (session) owns an opened model and runs fold -> verify -> save; fold_model and inspect_model
are thin over it. The sub-packages, by job: core (the rules and the loop that drives them), io (reading,
checking and writing models), verification (the proof, in a process of its own), quantized (QDQ models).
"""
from .core.affine import ChannelAffine
from .api import fold_model, inspect_model
from .errors import FoldError, VerificationError, VerifierCrashed
from .report import Action, Cause, FoldReport, NodeOutcome
from .session import ModelSession
from .verification import OutputComparison, VerifyReport, verify

__all__ = [
    "fold_model",
    "inspect_model",
    "ModelSession",
    "verify",
    "FoldReport",
    "NodeOutcome",
    "Action",
    "Cause",
    "VerifyReport",
    "OutputComparison",
    "ChannelAffine",
    "FoldError",
    "VerificationError",
    "VerifierCrashed",
]
