"""foldnorm.fold: fold frozen BatchNormalization into the neighbouring layers of an ONNX model.

Every inference-mode BatchNormalization, and every per-channel Mul/Add/Sub/Div by a constant, is read as
one per-channel affine map (`ChannelAffine`) and moved into the weights of a Conv, ConvTranspose, Gemm or
MatMul next to it: backward into the layer that produces its input, forward into the layer that reads its
output, or across an Add/Sum/Concat of several layers. What cannot fold stays as it is, unless per-channel
maps after it merge into one Mul and one Add. The result is checked against the original model in
onnxruntime (`verify`).

`ModelSession` (session) owns an opened model and runs fold -> verify -> save; fold_model and inspect_model
are thin over it. The sub-packages, by job: core (the rules and the loop that drives them), io (reading,
checking and writing models), verification (the proof, in a process of its own), quantized (QDQ models).
"""
import importlib

# Where each public name lives; loaded on first use, so that a step imports only what it needs (the
# verifying process is started before onnx is imported here).
_HOME = {
    "ChannelAffine": ".core.affine", "fold_model": ".api", "inspect_model": ".api", "FoldError": ".errors",
    "VerificationError": ".errors", "VerifierCrashed": ".errors", "Action": ".report", "Cause": ".report",
    "FoldReport": ".report", "NodeOutcome": ".report", "ModelSession": ".session",
    "OutputComparison": ".verification.runner", "VerifyReport": ".verification.runner",
    "verify": ".verification.isolated",
}

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


def __getattr__(name):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
