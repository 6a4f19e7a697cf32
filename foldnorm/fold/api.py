"""The fold pass's public functions, thin over foldnorm.fold.session.ModelSession: fold_model, inspect_model."""
from __future__ import annotations

import os

import onnx

from .report import FoldReport
from .session import ModelSession, divergence_error


def fold_model(model_or_path: onnx.ModelProto | str | os.PathLike, *, rewrite_bn: bool = False,
               verify: bool = True, shapes: dict[str, list[int]] | None = None, rtol: float | None = None,
               atol: float | None = None, seed: int = 0, fold_through_qdq: bool = False,
               steps: float | None = None, fold_input_initializers: bool = False,
               keep_bn: bool | None = None) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every foldable normalization of a model.

    Parameters
    ----------
    model_or_path : onnx.ModelProto or path
        The model. A ModelProto is never modified; a path is read once, folded in place (no second copy in
        memory) and its external data read when the pass needs it; the folded model holds all its data.
    rewrite_bn : bool
        Rewrite a BatchNormalization that cannot fold as Mul and Add even when nothing merges into them. By
        default it stays a BatchNormalization, which onnxruntime runs in one pass where Mul and Add take two.
    verify : bool
        Check the folded model against the original (foldnorm.verify), in a child process.
    shapes, rtol, atol, seed
        Passed to foldnorm.verify.
    fold_through_qdq : bool
        Also fold a BatchNormalization that reads a QuantizeLinear -> DequantizeLinear pair after a layer,
        dropping the pair (one rounding step fewer: close to the original, not exact).
    steps : float or None
        The verification tolerance for quantized outputs, in their quantization steps (default 1 when every
        quantized fold is exact, 3 otherwise).
    fold_input_initializers : bool
        Treat an initializer the graph also lists as an input as a constant, and remove it from the inputs
        (by default it is a default value a caller may override, and the pass leaves what reads it).
    keep_bn : bool or None
        The former name of the default: keep_bn=False is rewrite_bn=True.

    Returns
    -------
    (onnx.ModelProto, FoldReport)
        The folded model and what happened to each normalization node. The folded model passes the
        checks its input passed (foldnorm.fold.io.modelio.check_model), and keeps the input's IR version.

    Raises
    ------
    FoldError
        The model is refused (neither the ONNX checker nor onnxruntime accepts it, opset outside 7 .. the
        newest onnx knows), or verification cannot run it (VerifierCrashed when onnxruntime crashed).
    VerificationError
        An output of the folded model diverges from the original's; it carries the report.
    """
    if keep_bn is not None:
        rewrite_bn = not keep_bn
    with ModelSession(model_or_path) as session:
        report = session.fold(rewrite_bn=rewrite_bn, fold_through_qdq=fold_through_qdq,
                              fold_input_initializers=fold_input_initializers)
        if verify:
            result = session.verify(shapes=shapes, rtol=rtol, atol=atol, seed=seed, steps=steps)
            if not result.passed:
                raise divergence_error(report, result)
        return session.folded_model(), report


def inspect_model(model_or_path: onnx.ModelProto | str | os.PathLike, *, fold_through_qdq: bool = False,
                  rewrite_bn: bool = False, fold_input_initializers: bool = False) -> FoldReport:
    """What fold_model would do to each normalization node: the FoldReport, without verification."""
    with ModelSession(model_or_path) as session:
        return session.fold(rewrite_bn=rewrite_bn, fold_through_qdq=fold_through_qdq,
                            fold_input_initializers=fold_input_initializers)
