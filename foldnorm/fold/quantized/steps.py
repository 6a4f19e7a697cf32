"""Verification of quantized outputs in quantization steps, end to end and layer by layer.

An output that a QuantizeLinear -> DequantizeLinear pair writes takes values on a grid of steps (the
DequantizeLinear's scale); one written by a QuantizeLinear is the integers themselves. Float rounding in
a folded layer can flip one rounding there, which is one whole step: a relative tolerance means nothing
for such an output, so foldnorm.fold.verification.runner compares it in steps instead. The tolerance: 1 step
for exact folds, 3 steps when a fold dropped a rounding step or requantized a channel
(foldnorm.fold.quantized.rules.default_step_tolerance), or the caller's.

In a deep network those one-step flips compound: every later layer requantizes values that already
moved by a step, and the output can end up several steps away although no layer is more than one step
off. So when an output is beyond the tolerance end to end, the models are compared layer by layer: every
activation QuantizeLinear of the original that the folded model still has is exposed, and the folded model
is run with each of its activation DequantizeLinear reading the original's integers instead of its own.
Each layer then sees exactly the original's input, and the output passes when every activation is within
the tolerance; the report keeps both figures (max_steps end to end, layer_steps layer by layer).
"""
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..verification.sessions import run_model
from ..verification.tolerance import OutputComparison

FORCED_SUFFIX = "__foldnorm_original"


@dataclass
class StepComparison(OutputComparison):
    """An OutputComparison of a quantized output: max_steps is the largest difference in its steps,
    step_tolerance the largest allowed."""

    max_steps: float = 0.0
    step_tolerance: float = 1.0
    layer_steps: float | None = None
    worst_layer: str = ""

    def tolerance_text(self):
        if self.layer_steps is None:
            return "%g steps (max %g)" % (self.step_tolerance, self.max_steps)
        return "%g steps (max %g; %g layer by layer)" % (self.step_tolerance, self.max_steps, self.layer_steps)

    def to_dict(self):
        values = super().to_dict()
        values.update(max_steps=self.max_steps if math.isfinite(self.max_steps) else None,
                      step_tolerance=self.step_tolerance, layer_steps=self.layer_steps, worst_layer=self.worst_layer)
        return values


def _constants(graph):
    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    return values


def output_steps(model):
    """{graph output: its step} for the main graph's outputs written by QuantizeLinear -> DequantizeLinear
    (the scale, shaped to broadcast along the DequantizeLinear's axis) or by QuantizeLinear (1.0)."""
    graph = model.graph
    producers = {name: node for node in graph.node for name in node.output}
    constants = _constants(graph)
    steps = {}
    for output in graph.output:
        node = producers.get(output.name)
        if node is None or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "QuantizeLinear":
            steps[output.name] = np.float64(1.0)
            continue
        source = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is None or source.op_type != "QuantizeLinear" or node.input[1] not in constants:
            continue
        scale = numpy_helper.to_array(constants[node.input[1]]).astype(np.float64)
        if scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            rank = len(output.type.tensor_type.shape.dim) if output.type.tensor_type.HasField("shape") else None
            if rank is None:
                continue
            shape = [1] * rank
            shape[axis % rank] = scale.size
            scale = scale.reshape(shape)
        steps[output.name] = scale
    return steps


def compare_in_steps(name, reference, candidate, step, tolerance):
    """Compare one quantized output; it passes when no element differs by more than `tolerance` steps."""
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    dtype = reference.dtype.name
    if candidate.shape != reference.shape or candidate.dtype != reference.dtype:
        return StepComparison(name, math.inf, math.inf, False, dtype, note="shape or dtype %s %s, original %s %s" % (
            candidate.shape, candidate.dtype, reference.shape, reference.dtype), max_steps=math.inf,
            step_tolerance=tolerance)
    difference = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        steps = np.where(difference == 0.0, 0.0, difference / np.broadcast_to(step, difference.shape))
    steps = np.where(np.isnan(steps), math.inf, steps)
    max_steps = float(steps.max()) if steps.size else 0.0
    max_abs = float(difference.max()) if difference.size else 0.0
    magnitude = float(np.abs(reference.astype(np.float64)).max()) if reference.size else 0.0
    max_rel = 0.0 if max_abs == 0.0 else (max_abs / magnitude if magnitude > 0.0 else math.inf)
    # half a step of slack: a difference of k steps is k * scale up to the float rounding of the outputs
    passed = bool(max_steps <= tolerance + 0.5)
    return StepComparison(name, max_abs, max_rel, passed, dtype, max_steps=round(max_steps, 3),
                          step_tolerance=tolerance)


def _activation_quantizers(graph):
    """The QuantizeLinear nodes of a graph that quantize values computed at run time."""
    constants = {t.name for t in graph.initializer}
    constants.update(n.output[0] for n in graph.node if n.op_type == "Constant")
    return [n for n in graph.node if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")
            and n.input[0] not in constants]


def _integer_type(graph, node):
    if len(node.input) > 2 and node.input[2]:
        for tensor in graph.initializer:
            if tensor.name == node.input[2]:
                return tensor.data_type
    return TensorProto.UINT8


def _with_outputs(model, names_and_types):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    copy.graph.output.extend(helper.make_tensor_value_info(name, elem_type, None)
                             for name, elem_type in names_and_types if name not in existing)
    return copy


def layer_by_layer(original, folded, feeds):
    """(largest difference in steps over every activation QuantizeLinear both models have, with each layer
    of the folded model reading the original's integers, and that activation's name); (None, "") when
    there is none to compare."""
    quantizers = [(n.output[0], _integer_type(original.graph, n)) for n in _activation_quantizers(original.graph)]
    kept = {n.output[0] for n in _activation_quantizers(folded.graph)}
    shared = [(name, elem_type) for name, elem_type in quantizers if name in kept]
    if not shared:
        return None, ""
    reference = run_model(_with_outputs(original, shared), feeds, "original")
    forced = _with_outputs(folded, shared)
    graph = forced.graph
    names = {name for name, _ in shared}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            continue
        for position, name in enumerate(node.input):
            if name in names:
                node.input[position] = name + FORCED_SUFFIX
    graph.input.extend(helper.make_tensor_value_info(name + FORCED_SUFFIX, elem_type, None)
                       for name, elem_type in shared)
    forced_feeds = dict(feeds)
    forced_feeds.update({name + FORCED_SUFFIX: reference[name] for name, _ in shared})
    actual = run_model(forced, forced_feeds, "folded")
    worst, where = 0.0, ""
    for name, _ in shared:
        difference = np.abs(actual[name].astype(np.int64) - reference[name].astype(np.int64))
        steps = float(difference.max()) if difference.size else 0.0
        if steps > worst:
            worst, where = steps, name
    return worst, where


class QuantizedOutputs:
    """The quantized outputs of one verification: compare() replaces the comparison of each output written
    by QuantizeLinear (-> DequantizeLinear) with its comparison in steps, the worst over the shape sets, and
    checks layer by layer (once, on the first shape set) the ones beyond the tolerance end to end.

    feeds, expected, actual: per shape set (actual None when the folded model could not run); steps: the
    tolerance in steps (1 when None).
    """

    def __init__(self, original, folded, feeds, expected, actual, steps):
        self.original, self.folded, self.feeds = original, folded, feeds
        self.expected, self.actual = expected, actual
        self.tolerance = 1.0 if steps is None else float(steps)
        self.steps = output_steps(original)
        self._layers = None

    def compare(self, comparisons):
        if not self.steps or self.actual is None:
            return comparisons
        result = []
        for comparison in comparisons:
            name = comparison.name
            if name not in self.steps or any(name not in outputs for outputs in self.actual):
                result.append(comparison)
                continue
            parts = [compare_in_steps(name, expected[name], actual[name], self.steps[name], self.tolerance)
                     for expected, actual in zip(self.expected, self.actual)]
            result.append(max(parts, key=lambda part: part.max_steps))
        failed = [c for c in result if isinstance(c, StepComparison) and not c.passed and not c.note]
        if failed:
            if self._layers is None:
                self._layers = layer_by_layer(self.original, self.folded, self.feeds[0])
            _settle(failed, *self._layers)
        return result


def _settle(failed, steps, where):
    """Each failed quantized output passes when every activation is within its tolerance layer by layer."""
    if steps is None:
        return
    for comparison in failed:
        comparison.layer_steps, comparison.worst_layer = steps, where
        comparison.passed = steps <= comparison.step_tolerance + 0.5
        if not comparison.passed:
            comparison.note = "%g steps at %r with the original's inputs to every layer" % (steps, where)
