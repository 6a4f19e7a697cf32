"""Verification of quantized outputs in quantization steps.

An output that a QuantizeLinear -> DequantizeLinear pair writes takes values on a grid of steps (the
DequantizeLinear's scale); one written by a QuantizeLinear is the integers themselves. Float rounding in
a folded layer can flip one rounding there, which is one whole step: a relative tolerance means nothing
for such an output, so foldnorm.fold.verification compares it in steps instead. The tolerance: 1 step
for exact folds, 3 steps when a fold dropped a rounding step or requantized a channel
(foldnorm.fold.quantized.default_step_tolerance), or the caller's.
"""
import math
from dataclasses import dataclass

import numpy as np
from onnx import numpy_helper

from .tolerance import OutputComparison


@dataclass
class StepComparison(OutputComparison):
    """An OutputComparison of a quantized output: max_steps is the largest difference in its steps,
    step_tolerance the largest allowed."""

    max_steps: float = 0.0
    step_tolerance: float = 1.0

    def tolerance_text(self):
        return "%g steps (max %g)" % (self.step_tolerance, self.max_steps)

    def to_dict(self):
        values = super().to_dict()
        values.update(max_steps=self.max_steps if math.isfinite(self.max_steps) else None,
                      step_tolerance=self.step_tolerance)
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


class QuantizedOutputs:
    """The quantized outputs of one verification: compare() replaces the comparison of each output written
    by QuantizeLinear (-> DequantizeLinear) with its comparison in steps, the worst over the shape sets.

    feeds, expected, actual: per shape set (actual None when the folded model could not run); steps: the
    tolerance in steps (1 when None).
    """

    def __init__(self, original, folded, feeds, expected, actual, steps):
        self.original, self.folded, self.feeds = original, folded, feeds
        self.expected, self.actual = expected, actual
        self.tolerance = 1.0 if steps is None else float(steps)
        self.steps = output_steps(original)

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
        return result
