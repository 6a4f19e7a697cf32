"""Verification: the original and the folded model run on the same inputs and compared (runner), in a
process of its own (isolated), what each run reads (sessions), the inputs' shapes (shapes) and how outputs
are judged (tolerance). The names below load runner (onnx, NumPy) on first use; verify is isolated's,
which runs runner's in a child process."""
import importlib

__all__ = ["verify", "VerifyReport", "OutputComparison", "make_inputs", "run_model", "quiet_onnxruntime"]


def __getattr__(name):
    if name not in __all__:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    home = ".isolated" if name == "verify" else ".runner"  # foldnorm.verify: in a process of its own
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value
