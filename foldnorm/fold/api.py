"""The fold pass's public functions: fold_model and inspect_model."""
import time

import onnx

from .driver import fold_in_place, inline_functions_holding_batch_norm
from .errors import VerificationError
from .modelio import as_model
from .proto import graph_statistics
from .report import FoldReport, count_layers


def fold_model(model_or_path, *, keep_bn=False, verify=True, shapes=None, rtol=None, atol=None, seed=0,
               fold_through_qdq=False, steps=None):
    """Fold every foldable normalization of a model.

    Parameters
    ----------
    model_or_path : onnx.ModelProto or path
        The model. A ModelProto is never modified; a path is read with its external data.
    keep_bn : bool
        Leave a BatchNormalization that cannot fold as it is instead of rewriting it as Mul and Add.
    verify : bool
        Check the folded model against the original in onnxruntime (foldnorm.verify).
    shapes, rtol, atol, seed
        Passed to foldnorm.verify.
    fold_through_qdq : bool
        Also fold a BatchNormalization that reads a QuantizeLinear -> DequantizeLinear pair after a layer,
        dropping the pair (one rounding step fewer: close to the original, not exact).
    steps : float or None
        The verification tolerance for quantized outputs, in their quantization steps (default 1 when every
        quantized fold is exact, 3 otherwise).

    Returns
    -------
    (onnx.ModelProto, FoldReport)
        The folded model and what happened to each normalization node.

    Raises
    ------
    FoldError
        The model is refused (invalid, opset outside 7 .. the newest onnx knows).
    VerificationError
        An output of the folded model diverges from the original's; it carries the report.
    """
    original, label = as_model(model_or_path, "model_or_path")
    start = time.perf_counter()
    folded = onnx.ModelProto()
    folded.CopyFrom(original)
    inlined = inline_functions_holding_batch_norm(folded)
    outcomes = fold_in_place(folded, keep_bn=keep_bn, fold_through_qdq=fold_through_qdq)
    seconds = time.perf_counter() - start
    nodes_before, bytes_before = graph_statistics(original.graph)
    nodes_after, bytes_after = graph_statistics(folded.graph)
    report = FoldReport(model=label, outcomes=outcomes, nodes_before=nodes_before, nodes_after=nodes_after,
                        param_bytes_before=bytes_before, param_bytes_after=bytes_after, fold_seconds=seconds,
                        layers=count_layers(original.graph))
    if inlined:
        report.notes.append("inlined the model's local functions %s, which hold BatchNormalization nodes, "
                            "to fold them" % ", ".join(inlined))
    if bytes_after > bytes_before:
        report.notes.append("the parameters grew: a folded weight is stored in full, also where the model "
                            "computed it from a smaller constant (ConstantOfShape, Expand, ...)")
    if verify:
        from .verification import verify as verify_models

        from .quantized import default_step_tolerance

        steps = default_step_tolerance(outcomes) if steps is None else steps
        result = verify_models(original, folded, shapes=shapes, rtol=rtol, atol=atol, seed=seed, steps=steps)
        report.verification = result
        if not result.passed:
            diverged = ", ".join(repr(o.name) for o in result.outputs if not o.passed)
            raise VerificationError("the folded model's output %s differs from the original's beyond the "
                                    "tolerance; nothing was written" % diverged, report)
    return folded, report


def inspect_model(model_or_path, *, fold_through_qdq=False):
    """What fold_model would do to each normalization node: the FoldReport, without verification."""
    _, report = fold_model(model_or_path, verify=False, fold_through_qdq=fold_through_qdq)
    return report
