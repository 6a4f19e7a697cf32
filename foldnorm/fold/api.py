"""The fold pass's public functions: fold_model and inspect_model."""
from __future__ import annotations

import os
import time

import onnx

from .driver import fold_in_place, inline_functions_holding_batch_norm
from .errors import VerificationError
from .external_data import load_referenced
from .modelio import check_model, open_model
from .proto import attribute_graphs, graph_statistics
from .report import FoldReport, count_layers

# IR versions before 4 list every initializer among the graph inputs as well.
INITIALIZERS_ARE_INPUTS_BELOW_IR = 4


def fold_model(model_or_path: onnx.ModelProto | str | os.PathLike, *, keep_bn: bool = False, verify: bool = True,
               shapes: dict[str, list[int]] | None = None, rtol: float | None = None, atol: float | None = None,
               seed: int = 0, fold_through_qdq: bool = False,
               steps: float | None = None) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every foldable normalization of a model.

    Parameters
    ----------
    model_or_path : onnx.ModelProto or path
        The model. A ModelProto is never modified; a path is read, folded in place (no second copy in
        memory) and its external data read when the pass needs it; the folded model holds all its data.
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
        The folded model and what happened to each normalization node. The folded model passes the
        checks its input passed (foldnorm.fold.modelio.check_model), and keeps the input's IR version.

    Raises
    ------
    FoldError
        The model is refused (neither the ONNX checker nor onnxruntime accepts it, opset outside 7 .. the
        newest onnx knows).
    VerificationError
        An output of the folded model diverges from the original's; it carries the report.
    """
    folded, report = _fold(model_or_path, keep_bn=keep_bn, fold_through_qdq=fold_through_qdq, hold_weights=False)
    if verify:
        from .quantized import default_step_tolerance
        from .verification import verify as verify_models

        steps = default_step_tolerance(report.outcomes) if steps is None else steps
        # A model read here was folded in place: the original is read again from its file.
        result = verify_models(model_or_path, folded, shapes=shapes, rtol=rtol, atol=atol, seed=seed, steps=steps)
        report.verification = result
        if not result.passed:
            diverged = ", ".join(repr(o.name) for o in result.outputs if not o.passed)
            raise VerificationError("the folded model's output %s differs from the original's beyond the "
                                    "tolerance; nothing was written" % diverged, report)
    return folded, report


def fold_for_saving(model_or_path, *, keep_bn=False, fold_through_qdq=False):
    """fold_model without verification, for a model that is then only written with
    save_model(..., external_data=True) or compared with foldnorm.verify (what `foldnorm fold` does with a
    model kept in external data): each large folded weight stays the NumPy array the fold computed, and
    save_model writes it straight to the data file, instead of a copy into the protobuf and a copy out.
    Anything else reading the result's tensors must use fold_model. The arrays are held until
    external_data.load_referenced copies them into the model, or the process ends.
    Returns (folded model, FoldReport)."""
    return _fold(model_or_path, keep_bn=keep_bn, fold_through_qdq=fold_through_qdq, hold_weights=True)


def _fold(model_or_path, *, keep_bn, fold_through_qdq, hold_weights):
    opened = open_model(model_or_path, "model_or_path", in_place=True)
    original = opened.model
    start = time.perf_counter()
    nodes_before, bytes_before = graph_statistics(original.graph)
    layers = count_layers(original.graph)  # before the fold, which may work on `original` itself
    if opened.owned:
        folded = original  # read from the file just now: no one else holds it
    else:
        folded = onnx.ModelProto()
        folded.CopyFrom(original)
    declared = folded.ir_version < INITIALIZERS_ARE_INPUTS_BELOW_IR
    read_before = names_read(folded.graph) if declared else None
    inlined = inline_functions_holding_batch_norm(folded)
    outcomes = fold_in_place(folded, keep_bn=keep_bn, fold_through_qdq=fold_through_qdq)
    if declared:
        drop_released_declarations(folded.graph, read_before)
    # The data of the tensors the pass left as they were, and unless held, of the weights it made.
    load_referenced(folded, held=not hold_weights)
    seconds = time.perf_counter() - start
    check_model(folded, "the folded model", at_least=opened.check.level)
    nodes_after, bytes_after = graph_statistics(folded.graph)
    report = FoldReport(model=opened.label, outcomes=outcomes, nodes_before=nodes_before, nodes_after=nodes_after,
                        param_bytes_before=bytes_before, param_bytes_after=bytes_after, fold_seconds=seconds,
                        layers=layers)
    if opened.check.note:
        report.notes.append(opened.check.note)
    if inlined:
        report.notes.append("inlined the model's local functions %s, which hold BatchNormalization nodes, "
                            "to fold them" % ", ".join(inlined))
    if bytes_after > bytes_before:
        report.notes.append("the parameters grew: a folded weight is stored in full, also where the model "
                            "computed it from a smaller constant (ConstantOfShape, Expand, ...)")
    return folded, report


def inspect_model(model_or_path: onnx.ModelProto | str | os.PathLike, *,
                  fold_through_qdq: bool = False) -> FoldReport:
    """What fold_model would do to each normalization node: the FoldReport, without verification."""
    _, report = fold_model(model_or_path, verify=False, fold_through_qdq=fold_through_qdq)
    return report


def names_read(graph):
    """Every value name a graph's nodes read (their subgraphs' included) or it outputs."""
    read = {value.name for value in graph.output}
    for node in graph.node:
        read.update(name for name in node.input if name)
        for _, subgraph in attribute_graphs(node):
            read |= names_read(subgraph)
    return read


def drop_released_declarations(graph, read_before):
    """Remove, from a graph of IR version < 4, the initializers the fold stopped reading together with the
    graph inputs that declare them: there a graph input that names an initializer is its declaration,
    not an input a caller feeds. What the model already left unread stays as it was."""
    inputs = {value.name for value in graph.input}
    read_now = names_read(graph)
    released = {tensor.name for tensor in graph.initializer
                if tensor.name in inputs and tensor.name in read_before and tensor.name not in read_now}
    if released:
        _delete_where(graph.initializer, lambda tensor: tensor.name in released)
        _delete_where(graph.input, lambda value: value.name in released)


def _delete_where(repeated, condition):
    """Delete the elements of a repeated protobuf field for which condition(element) holds, in place
    (the elements kept are not copied)."""
    for position in reversed(range(len(repeated))):
        if condition(repeated[position]):
            del repeated[position]
