"""Proof that a folded model computes what the original computes: both run in onnxruntime, compared.

`verify` (public as foldnorm.verify) runs the original and the folded model in onnxruntime's CPU provider
with every graph optimization DISABLED (ORT_DISABLE_ALL), so the check tests our folding and not
onnxruntime's own, on the same seeded random inputs, and compares every graph output. A third run, of the
original with every optimization enabled, measures the model's own rounding noise on those inputs, which
widens the default tolerance (foldnorm.fold.verification.tolerance says how, and how each output is judged); for a
model with more than NOISE_ALWAYS_BYTES of parameters that run happens only when an output exceeds the
default tolerance without it.

Input shapes (foldnorm.fold.verification.shapes says how sizes are chosen): a fixed dim keeps its size; a dynamic dim
takes its size from `shapes` ({input name: [dims]}) when given, and is otherwise chosen by trying
candidate sizes until onnxruntime runs the original. With chosen sizes, the models are compared at two
shapes whose batch and other sizes differ, so a fold that is right at one shape only fails; the report
lists the shapes and says they were chosen.

Memory: the sessions run one after another, each closed before the next opens, and each model reaches
onnxruntime without a copy in foldnorm where it can (foldnorm.fold.verification.sessions): a model given as a path is
handed over as that file, which onnxruntime reads itself, and a large model given in memory is written
once, its large tensors in a data file, for all its sessions.

Inputs, one array per graph input that is not an initializer, drawn from `numpy.random.default_rng`
(seed, then seed + 1 for the second shape) in graph-input order:
- float16 / bfloat16 / float / double: standard normal values, rounded to the input's dtype;
- integer types: uniform integers in [0, 4) (small, so that they stay valid as indices);
- bool: True or False with equal probability (a rank-0 input is a 0-d array).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from typing import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import FoldError
from ..io.messages import one_line
from ..io.proto import graph_statistics
from ..quantized.steps import QuantizedOutputs
from .sessions import ORT_LOG_SEVERITY, MissingKernel, ModelSource, bfloat16_dtype, run_all, run_model
from .shapes import (LADDER_SECONDS, ShapeError, check_input_bytes, chosen_axes, concrete_shapes, first_candidates,
                     format_dims, input_specs, second_candidates, symbols)
from .tolerance import (NOISE_FACTOR, OutputComparison, compare_output, diverged, dtype_name, format_error,
                        json_float, merge_comparisons, rounding_noise)

INTEGER_INPUT_HIGH = 4
# Parameter bytes above which the noise run (a third onnxruntime session) happens only when an output
# exceeds the default tolerance without it.
NOISE_ALWAYS_BYTES = 256 * 2**20
# Parameter bytes up to which onnx's reference evaluator verifies a model onnxruntime has no kernel for.
REFERENCE_LIMIT_BYTES = 16 * 2**20

_FLOAT_INPUT_TYPES = {
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
}
_INTEGER_INPUT_TYPES = {
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.UINT64: np.uint64,
}


@dataclass
class VerifyReport:
    """The outcome of `verify`.

    rtol / atol are the caller's tolerances, or, when defaulted, the largest used for any output (each
    output's own are in `outputs`, with the original's rounding noise). input_shapes is the first shape
    the models ran at and shape_sets every one ({input name: [dims]} each); dynamic_dims names, per input,
    the axes whose size verification chose (empty when `shapes` or the model fixed them all); each output
    in `outputs` is the worst over all shapes.
    """

    passed: bool
    rtol: float
    atol: float
    input_shapes: dict
    outputs: list
    seconds: float
    shape_sets: list = field(default_factory=list)
    dynamic_dims: dict = field(default_factory=dict)
    noise_factor: float = NOISE_FACTOR
    notes: list = field(default_factory=list)
    verifier: str = "onnxruntime"

    @property
    def failed_outputs(self):
        return [o for o in self.outputs if not o.passed]

    @property
    def shapes_chosen(self):
        """Whether verification chose the size of some dynamic dim."""
        return bool(self.dynamic_dims)

    def to_dict(self):
        return {
            "passed": self.passed,
            "rtol": json_float(self.rtol),
            "atol": json_float(self.atol),
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "shape_sets": [{k: list(v) for k, v in shapes.items()} for shapes in self.shape_sets],
            "shapes_chosen": self.shapes_chosen,
            "dynamic_dims": {k: list(v) for k, v in self.dynamic_dims.items()},
            "noise_factor": self.noise_factor,
            "outputs": [o.to_dict() for o in self.outputs],
            "notes": list(self.notes),
            "seconds": self.seconds,
            "verifier": self.verifier,
        }

    def format_text(self):
        how = "onnxruntime (graph optimizations disabled)" if self.verifier == "onnxruntime" else self.verifier
        lines = ["verification against %s: %s in %.2f s" % (how, "passed" if self.passed else "FAILED", self.seconds)]
        for index, shapes in enumerate(self.shape_sets or [self.input_shapes]):
            inputs = ", ".join("%s=%s" % (k, format_dims(v)) for k, v in shapes.items())
            label = "inputs" if len(self.shape_sets) < 2 else "inputs (shape %d)" % (index + 1)
            lines.append("  %s: %s" % (label, inputs or "(none)"))
        if self.dynamic_dims:
            where = ", ".join("%s axis %s" % (k, ",".join(map(str, v))) for k, v in self.dynamic_dims.items())
            lines.append("  sizes of the dynamic dims chosen by foldnorm (%s); <<shapes>> sets them" % where)
        for note in self.notes:
            lines.append("  note: %s" % note)
        width = max([len("output")] + [len(o.name) for o in self.outputs])
        row = "  %-*s  %-11s  %-11s  %-11s  %-24s  %s"
        lines.append(row % (width, "output", "max abs err", "max rel err", "model noise", "tolerance", "result"))
        for o in self.outputs:
            tolerance = o.tolerance_text()
            result = "ok" if o.passed else "DIVERGED" + (" (%s)" % o.note if o.note else "")
            numbers = format_error(o.max_abs_error), format_error(o.max_rel_error), format_error(o.noise)
            lines.append(row % ((width, o.name) + numbers + (tolerance, result)))
        lines.append("  (model noise: how far onnxruntime's optimized run of the original is from its plain run; "
                     "the default atol is at least %g times it)" % self.noise_factor)
        return "\n".join(lines)


def verify(original: onnx.ModelProto | str | os.PathLike, folded: onnx.ModelProto | str | os.PathLike, *,
           shapes: dict[str, list[int]] | None = None, rtol: float | None = None, atol: float | None = None,
           seed: int = 0, progress: Callable[[str], None] | None = None,
           steps: float | None = None) -> VerifyReport:
    """foldnorm.verify's work, in this process: verification.isolated.verify (foldnorm.verify) runs it in a
    process of its own and documents the arguments, the result and the errors. `original` may also be a
    sessions.ModelSource (a session's model: its structure already read, its file)."""
    start = time.perf_counter()
    options = check_options(shapes=shapes, rtol=rtol, atol=atol, seed=seed, steps=steps)
    shapes, rtol, atol = options["shapes"], options["rtol"], options["atol"]
    say = progress or (lambda message: None)
    with contextlib.ExitStack() as stack:
        if isinstance(original, ModelSource):  # a session's model: its structure and its file (verification.isolated)
            original = stack.enter_context(original)
        else:
            original = stack.enter_context(ModelSource.open(original, "original"))
        folded = stack.enter_context(ModelSource.open(folded, "folded"))
        report = _verify(original, folded, shapes, rtol, atol, seed, say, steps)
    report.seconds = time.perf_counter() - start
    return report


def _verify(original, folded, shapes, rtol, atol, seed, say, steps):
    """verify() on two ModelSources; the report's seconds are left to the caller."""
    specs = input_specs(original.model, shapes)
    say("verification: loading the original model in onnxruntime")
    try:
        session = original.session("original", optimized=False)
    except MissingKernel as missing:
        return _verify_by_reference(original, folded, specs, rtol, atol, seed, say, steps, missing)
    try:
        shape_sets, feeds, expected, notes = _run_original(session, specs, original.model, seed, say)
    finally:
        del session
        gc.collect()  # the original's weights leave onnxruntime before the folded model's arrive

    say("verification: running the folded model")
    actual, folded_error = run_all(folded, "folded", feeds, optimized=False)
    quantized = QuantizedOutputs(original.model, folded.model, feeds, expected, actual, steps)
    comparisons = quantized.compare(_compare_all(expected, actual, folded_error, None, rtol, atol))
    large = graph_statistics(original.model.graph)[1] > NOISE_ALWAYS_BYTES
    if folded_error is None and large and all(c.passed for c in comparisons):
        # A large model's third session costs seconds: its noise is measured only when an output needs it.
        notes.append("the model's rounding noise was not measured: every output is within the default "
                     "tolerance, and for a model this large it is measured only when one is not")
    elif folded_error is None:
        say("verification: measuring the original model's own rounding noise (onnxruntime, optimizations on)")
        noisy, noise_error = run_all(original, "original", feeds, optimized=True)
        if noise_error is not None:
            notes.append("the model's rounding noise was not measured (with optimizations on, %s)" % noise_error)
        else:
            comparisons = quantized.compare(_compare_all(expected, actual, folded_error, noisy, rtol, atol))
    return VerifyReport(
        passed=all(c.passed for c in comparisons),
        rtol=rtol if rtol is not None else max((c.rtol for c in comparisons), default=0.0),
        atol=atol if atol is not None else max((c.atol for c in comparisons), default=0.0),
        input_shapes=shape_sets[0],
        outputs=comparisons,
        seconds=0.0,
        shape_sets=shape_sets,
        dynamic_dims=chosen_axes(specs),
        notes=notes,
    )


def _verify_by_reference(original, folded, specs, rtol, atol, seed, say, steps, missing):
    """verify() with onnx's reference evaluator, for a model onnxruntime has no kernel for (a double Conv);
    within REFERENCE_LIMIT_BYTES of parameters, since it computes in NumPy, one node at a time."""
    from onnx.reference import ReferenceEvaluator

    size = graph_statistics(original.model.graph)[1]
    if size > REFERENCE_LIMIT_BYTES:
        raise FoldError("%s; onnx's reference evaluator, which verifies such models instead, is used up to %s bytes "
                        "of parameters and this model has %s (skip verification with <<no_verify>>)"
                        % (missing.template, format(REFERENCE_LIMIT_BYTES, ","), format(size, ",")))
    say("verification: onnxruntime cannot run the model; running it in onnx's reference evaluator")
    reference = _ReferenceSession(ReferenceEvaluator(original.full_model()))
    shape_sets, feeds, expected, notes = _run_original(reference, specs, original.model, seed, say)
    say("verification: running the folded model in onnx's reference evaluator")
    try:
        folded_session = _ReferenceSession(ReferenceEvaluator(folded.full_model()))
        actual, folded_error = [folded_session.run(f) for f in feeds], None
    except Exception as error:  # noqa: BLE001 - the evaluator raises many types; each is a finding
        actual, folded_error = None, "onnx's reference evaluator cannot run the folded model: %s" % one_line(error)
    quantized = QuantizedOutputs(original.model, folded.model, feeds, expected, actual, steps)
    comparisons = quantized.compare(_compare_all(expected, actual, folded_error, None, rtol, atol))
    notes.append("onnxruntime cannot run the original model (%s), so onnx's reference evaluator ran both models "
                 "(it verifies models of up to %s bytes of parameters); the model's rounding noise was not measured"
                 % (missing.template, format(REFERENCE_LIMIT_BYTES, ",")))
    return VerifyReport(
        passed=all(c.passed for c in comparisons),
        rtol=rtol if rtol is not None else max((c.rtol for c in comparisons), default=0.0),
        atol=atol if atol is not None else max((c.atol for c in comparisons), default=0.0),
        input_shapes=shape_sets[0], outputs=comparisons, seconds=0.0, shape_sets=shape_sets,
        dynamic_dims=chosen_axes(specs), notes=notes, verifier="onnx's reference evaluator")


class _ReferenceSession:
    """onnx's ReferenceEvaluator with the run(feeds) -> {output name: array} of a sessions.Session."""

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.names = list(evaluator.output_names)

    def run(self, feeds):
        return dict(zip(self.names, self.evaluator.run(None, feeds)))


def _compare_all(expected, actual, folded_error, noisy, rtol, atol):
    """One comparison per output of the original, the worst over the shape sets."""
    comparisons = []
    for name in expected[0]:
        parts = []
        for index, reference in enumerate(expected):
            if folded_error is not None:
                parts.append(diverged(name, dtype_name(reference[name]), folded_error))
            elif name not in actual[index]:
                parts.append(diverged(name, dtype_name(reference[name]), "missing from the folded model"))
            else:
                noise = None if noisy is None else rounding_noise(reference[name], noisy[index].get(name))
                parts.append(compare_output(name, reference[name], actual[index][name], rtol=rtol, atol=atol,
                                            noise=noise))
        comparisons.append(merge_comparisons(parts))
    return comparisons


def make_inputs(model, *, shapes=None, seed=0):
    """Seeded random inputs for every graph input that is not an initializer, without running the model.

    Dynamic dims not fixed by `shapes` take the first candidate sizes verification would try. Returns
    (feeds {name: array}, shapes {name: [dims]}, dims chosen {name: [axes]}); bfloat16 inputs are
    ml_dtypes.bfloat16 arrays.
    """
    specs = input_specs(model, _check_shapes(shapes))
    sizes = first_candidates(specs, model)[0] if symbols(specs) else {}
    used = concrete_shapes(specs, sizes)
    check_input_bytes(specs, used, "at these shapes")
    return _random_feeds(specs, used, seed), used, chosen_axes(specs)


def quiet_onnxruntime():
    """Keep onnxruntime's process-wide log lines off stderr (its errors still arrive as exceptions, which
    foldnorm reports as one line). The command line calls this; a library caller decides for its process."""
    import onnxruntime as ort

    ort.set_default_logger_severity(ORT_LOG_SEVERITY)


def _run_original(session, specs, model, seed, say):
    """Run the original at its shapes (chosen ones when some dim is dynamic).

    Returns (shape sets, feeds per set, outputs per set, notes).
    """
    if not symbols(specs):
        shapes = concrete_shapes(specs, {})
        check_input_bytes(specs, shapes, "at the shapes given or declared")
        say("verification: running the original model at %s" % _format_shapes(shapes))
        feeds = _random_feeds(specs, shapes, seed)
        try:
            outputs = session.run(feeds)
        except Exception as error:
            raise FoldError("onnxruntime cannot run the original model at %s: %s"
                            % (_format_shapes(shapes), one_line(error))) from None
        return [shapes], [feeds], [outputs], []

    first, tried, first_error = _first_that_runs(session, specs, first_candidates(specs, model), seed, say)
    if first is None:
        if not tried:
            raise ShapeError("no candidate size for the dynamic dims keeps the inputs within verification's "
                             "byte limit; give the input shapes with <<shapes>>")
        message = ("onnxruntime runs the original model at none of the %d input shapes tried (%s, ...): %s; "
                   % (len(tried), _format_shapes(tried[0]), first_error))
        raise ShapeError(message + "give the input shapes with <<shapes>>")
    sizes, shapes, feeds, outputs = first
    second, _, _ = _first_that_runs(session, specs, second_candidates(specs, model, sizes), seed + 1, say)
    if second is None:
        return [shapes], [feeds], [outputs], [
            "verified at one shape only: the original model ran at no other size tried"]
    _, shapes2, feeds2, outputs2 = second
    return [shapes, shapes2], [feeds, feeds2], [outputs, outputs2], []


def _first_that_runs(session, specs, candidates, seed, say):
    """((sizes, shapes, feeds, outputs) of the first candidate the session runs, or None; shapes tried;
    the first error)."""
    tried, first_error = [], None
    start = time.perf_counter()
    for sizes in candidates:
        if tried and time.perf_counter() - start > LADDER_SECONDS:
            break
        shapes = concrete_shapes(specs, sizes)
        tried.append(shapes)
        say("verification: running the original model at %s" % _format_shapes(shapes))
        feeds = _random_feeds(specs, shapes, seed)
        try:
            return (sizes, shapes, feeds, session.run(feeds)), tried, None
        except Exception as error:
            if first_error is None:
                first_error = one_line(error)
    return None, tried, first_error


def _random_feeds(specs, shapes, seed):
    rng = np.random.default_rng(seed)
    return {spec.name: _random_tensor(rng, spec.elem_type, shapes[spec.name], spec.name) for spec in specs}


def _format_shapes(shapes):
    return ", ".join("%s=%s" % (name, format_dims(dims)) for name, dims in shapes.items()) or "no inputs"


def _random_tensor(rng, elem_type, shape, name):
    # np.asarray: NumPy returns a scalar, not an array, for a rank-0 shape; onnxruntime wants arrays.
    if elem_type in _FLOAT_INPUT_TYPES:
        return np.asarray(rng.standard_normal(shape), dtype=_FLOAT_INPUT_TYPES[elem_type])
    if elem_type == onnx.TensorProto.BFLOAT16:
        return np.asarray(rng.standard_normal(shape), dtype=np.float32).astype(bfloat16_dtype())
    if elem_type in _INTEGER_INPUT_TYPES:
        return np.asarray(rng.integers(0, INTEGER_INPUT_HIGH, size=shape), dtype=_INTEGER_INPUT_TYPES[elem_type])
    if elem_type == onnx.TensorProto.BOOL:
        return np.asarray(rng.random(shape) < 0.5)
    known = elem_type in onnx.TensorProto.DataType.values()
    type_name = onnx.TensorProto.DataType.Name(elem_type) if known else str(elem_type)
    raise FoldError("input %r has element type %s, for which verification cannot make inputs (skip verification with <<no_verify>>)"
                    % (name, type_name))


def check_options(*, shapes, rtol, atol, seed, steps):
    """verify()'s options, checked (TypeError, ValueError or FoldError naming the argument), as a dict of
    its keyword arguments."""
    return {"shapes": _check_shapes(shapes), "rtol": _check_tolerance(rtol, "rtol"),
            "atol": _check_tolerance(atol, "atol"), "seed": seed, "steps": steps}


def _check_tolerance(value, name):
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError("%s must be a number, got %r" % (name, value)) from None
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError("%s must be a finite non-negative number, got %r" % (name, value))
    return value



def _check_shapes(shapes):
    """{name: [dims]} with non-negative int dims, or {} for None."""
    if shapes is None:
        return {}
    if not isinstance(shapes, dict):
        raise TypeError("shapes must be a dict {input name: [dims]}, got %s" % type(shapes).__name__)
    checked = {}
    for name, dims in shapes.items():
        try:
            dims = [int(d) for d in dims]
        except (TypeError, ValueError):
            raise FoldError("the shape for input %r must be a list of ints, got %r" % (name, dims)) from None
        if any(d < 0 for d in dims):
            raise FoldError("the shape for input %r must not have negative dims, got %s" % (name, dims))
        checked[name] = dims
    return checked




__all__ = ["verify", "VerifyReport", "OutputComparison", "compare_output", "make_inputs", "run_model",
           "quiet_onnxruntime"]
