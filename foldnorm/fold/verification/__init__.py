"""Verification: the original and the folded model run on the same inputs and compared (runner), what
each run reads (sessions), the inputs' shapes (shapes) and how outputs are judged (tolerance)."""
from .runner import OutputComparison, VerifyReport, make_inputs, quiet_onnxruntime, run_model, verify

__all__ = ["verify", "VerifyReport", "OutputComparison", "make_inputs", "run_model", "quiet_onnxruntime"]
