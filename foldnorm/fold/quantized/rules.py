"""Folding a BatchNormalization into a layer whose weight is quantized (a QDQ model).

Two shapes of graph are folded, both by the one rule in this module (listed in foldnorm.fold.core.rules):

- Quantization-aware exports: DequantizeLinear(integer weight, scale, zero point) -> Conv / ConvTranspose /
  Gemm / MatMul -> BatchNormalization. The map goes into the weight's scales and integers
  (foldnorm.fold.quantized.weights): exact where the integers allow it, a channel requantized (its change
  reported in steps of its scale) where they do not, refused where that change would exceed one step.
- Post-training-quantized graphs: layer -> QuantizeLinear -> DequantizeLinear -> BatchNormalization. Only
  with fold_through_qdq: the fold drops that pair, which removes one rounding of the layer's output, so
  the result is close to the original (checked in quantization steps of the outputs), not exact.

The result stays a QDQ model: the new weight is a new DequantizeLinear of new integer constants (per channel
along the layer's output axis: 0 for Conv and Gemm with transB=1, 1 for ConvTranspose, MatMul and Gemm
with transB=0), and a bias that was DequantizeLinear of int32 -- or a missing one, when the layer's input
comes from a DequantizeLinear -- becomes int32 at scale input scale x weight scale, which is what
onnxruntime's integer Conv/Gemm assume. So onnxruntime still fuses the layer into its integer kernels.
"""
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..core.constants import Constant
from ..core.context import Refused, describe, float_constant, rank_of
from ..core.layers import LAYER_KINDS, Layer, absorb_into, is_layer, read_layer, write_absorption
from ..io.proto import is_default_domain, node_attributes, set_float_attribute
from .weights import QuantizedWeight, requantize_bias, rescale
from ..core.sites import batch_norm_site

DEQUANTIZE = "DequantizeLinear"
QUANTIZE = "QuantizeLinear"
PER_AXIS_OPSET = 13  # DequantizeLinear's axis attribute (per-channel scales) arrived in opset 13
STEPS_EXACT = 1.0  # an exact fold: float rounding may flip one rounding of an output
STEPS_INEXACT = 3.0  # a fold that dropped a rounding step or requantized a channel
MAX_REQUANTIZE_STEPS = 1.0  # the most a requantized channel's weights may move, in steps of its scale
FLAG = "<<fold_through_qdq>>"


@dataclass
class QuantizedFold:
    """What folding one map into a quantized layer did, for the report.

    weight: the weight's integer type ("int8", ...) or "float"; granularity: "per-channel",
    "per-tensor" or "per-tensor -> per-channel"; negated / requantized: the output channels whose integers
    were negated around the zero point or requantized; weight_steps: the largest change of a requantized
    channel's weights in steps of its scale (0 when none was); bias: "int32", "float" or "none";
    bias_steps: the largest rounding of an int32 bias, in steps of its scale; through_qdq: a
    QuantizeLinear -> DequantizeLinear pair between the layer and the map was dropped; dropped_steps: the
    most that dropping its rounding moves the map's output, in steps of the QuantizeLinear after the map
    (max |a| x the pair's step / 2 / that step; None when either step is not a constant), clipping aside.
    """

    layer: str
    weight: str
    granularity: str
    channels: int
    negated: list
    requantized: list
    weight_steps: float
    bias: str
    bias_steps: float
    through_qdq: bool
    dropped_steps: float | None = None

    @property
    def exact(self):
        """Whether the folded layer computes what the layer and the map did, up to float rounding."""
        return not self.through_qdq and not self.requantized

    def describe(self):
        parts = ["%s weight" % self.weight]
        if self.weight != "float":
            parts[0] += ", %s" % self.granularity
            parts.append("%d channels rescaled" % self.channels)
            if self.negated:
                parts.append("%d negated" % len(self.negated))
            if self.requantized:
                parts.append("%d requantized (channels %s; weights moved by up to %.2f step of their scale)"
                             % (len(self.requantized), _list(self.requantized), self.weight_steps))
        if self.bias == "int32":
            parts.append("int32 bias requantized (rounding up to %.2f step)" % self.bias_steps)
        elif self.bias == "float":
            parts.append("float bias")
        if self.dropped_steps is not None:
            parts.append("dropping the pair's rounding moves its output by up to %.2f step where the pair did "
                         "not clip" % self.dropped_steps)
        return "; ".join(parts)


@dataclass
class QuantizedMatch:
    """What the rule found (foldnorm.fold.core.rules.Match's role): the site, and either the float absorption of a
    float layer or the quantized layer's new weight and bias, with the plan for the report."""

    site: object
    reason: str
    into: str
    absorption: object = None
    layer_node: object = None
    weight_node: object = None
    rescaled: object = None
    weight_type: int = 0
    bias_values: np.ndarray | None = None
    bias_type: int = TensorProto.FLOAT
    bias_int32: tuple | None = None
    beta: float | None = None
    pair: tuple = ()
    plan: QuantizedFold | None = None


def _list(channels, limit=8):
    shown = ", ".join(str(c) for c in channels[:limit])
    return shown + (", ..." if len(channels) > limit else "")


def is_dequantize(node):
    return node is not None and node.op_type == DEQUANTIZE and is_default_domain(node)


def _type_name(elem_type):
    return TensorProto.DataType.Name(elem_type).lower()


def quantized_weight(index, node):
    """(DequantizeLinear node, QuantizedWeight) when `node`'s weight is DequantizeLinear of constants;
    a str saying why not when it is a DequantizeLinear that cannot be read; None when it is no
    DequantizeLinear at all."""
    dq = index.producer.get(node.input[1]) if len(node.input) > 1 else None
    if not is_dequantize(dq):
        return None
    values = [index.constant(name) if name else None for name in list(dq.input) + [""] * (3 - len(dq.input))]
    integers, scale, zero_point = values[:3]
    if integers is None or scale is None or (len(dq.input) > 2 and dq.input[2] and zero_point is None):
        return "its weight's DequantizeLinear %r reads values computed at run time" % dq.name
    attributes = node_attributes(dq)
    if attributes.get("block_size", 0):
        return "its weight is block-quantized (block_size=%d)" % attributes["block_size"]
    if scale.elem_type != TensorProto.FLOAT or attributes.get("output_dtype", TensorProto.FLOAT) != TensorProto.FLOAT:
        return "its weight's scale is %s; only float32 scales are rescaled" % _type_name(scale.elem_type)
    ndim = integers.array.ndim
    axis = int(attributes.get("axis", 1))
    if scale.array.size == 1:
        axis = None
    elif not -ndim <= axis < ndim or scale.array.shape != (integers.array.shape[axis],):
        return "its weight's scale of shape %s does not match axis %d" % (scale.array.shape, axis)
    else:
        axis %= ndim
    zp = None if zero_point is None else zero_point.array
    return dq, QuantizedWeight(integers=integers.array, scale=np.asarray(scale.array, dtype=np.float32),
                               zero_point=zp, axis=axis, elem_type=integers.elem_type)


def _output_layout(op_type, shape, attributes):
    """(out_axis, channel_of): the weight axis along the layer's output channels, and the output channel of
    every element of np.moveaxis(weight, out_axis, 0)."""
    if op_type == "Conv":
        return 0, np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    if op_type == "ConvTranspose":
        group = int(attributes.get("group", 1))
        per_group, rows = shape[1], shape[0]
        block = np.arange(rows) // (rows // group)
        channel_of = block[None, :] * per_group + np.arange(per_group)[:, None]
        return 1, channel_of.reshape(channel_of.shape + (1,) * (len(shape) - 2))
    out_axis = 0 if op_type == "Gemm" and attributes.get("transB", 0) else 1
    return out_axis, np.arange(shape[out_axis])[:, None]


def _slot_of_channel(op_type, shape, attributes):
    """The weight scale slot (index along the output axis) of each output channel."""
    if op_type == "ConvTranspose":
        return np.tile(np.arange(shape[1]), int(attributes.get("group", 1)))
    out_axis, _ = _output_layout(op_type, shape, attributes)
    return np.arange(shape[out_axis])


def _input_scale(index, node):
    """The per-tensor scale of the layer's input when a DequantizeLinear of a constant scale writes it."""
    dq = index.producer.get(node.input[0])
    if not is_dequantize(dq):
        return None
    scale = index.constant(dq.input[1])
    if scale is None or scale.array.size != 1 or scale.elem_type != TensorProto.FLOAT:
        return None
    return float(np.asarray(scale.array).reshape(-1)[0])


def _through_pair(index, value):
    """(QuantizeLinear, DequantizeLinear) when `value` is DequantizeLinear(QuantizeLinear(y)), else None."""
    dq = index.producer.get(value)
    if not is_dequantize(dq):
        return None
    q = index.producer.get(dq.input[0])
    if q is None or q.op_type != QUANTIZE or not is_default_domain(q):
        return None
    return q, dq


def _scalar_scale(index, node):
    scale = index.constant(node.input[1]) if len(node.input) > 1 else None
    if scale is None or scale.array.size != 1:
        return None
    return float(np.asarray(scale.array, dtype=np.float64).reshape(-1)[0])


def _dropped_steps(index, node, pair, affine):
    """How far dropping the pair's rounding moves the BN's output, in steps of the QuantizeLinear that
    reads it (see QuantizedFold.dropped_steps), or None."""
    after = index.only_reader(node.output[0])
    if after is None or after.op_type != QUANTIZE or not is_default_domain(after):
        return None
    before, step = _scalar_scale(index, pair[1]), _scalar_scale(index, after)
    if before is None or not step:
        return None
    return float(np.abs(affine.scale).max() * before / 2.0 / step)


def _single_path(index, names_and_readers):
    for name, reader in names_and_readers:
        if index.only_reader(name) is not reader:
            return Refused("%r has readers other than %s, or is a graph output" % (name, describe(index, reader)))
    return None


def quantized_condition(ctx, index, node):
    """Fold a BN into a layer with a quantized weight, or through a QuantizeLinear -> DequantizeLinear pair
    (with fold_through_qdq)."""
    x = node.input[0] if node.input else None
    producer = index.producer.get(x) if x else None
    pair = _through_pair(index, x) if x else None
    if pair is not None:
        q, dq = pair
        layer_node = index.producer.get(q.input[0])
        if layer_node is None or not is_layer(layer_node):
            return Refused(None)
        what = describe(index, layer_node)
        if not ctx.fold_through_qdq:
            return Refused("its input passes through %s -> %s after %s; %s folds it there and drops that pair "
                           "(one rounding step fewer: close, not exact)" % (describe(index, q), describe(index, dq),
                                                                            what, FLAG))
        refused = _single_path(index, [(layer_node.output[0], q), (q.output[0], dq), (dq.output[0], node)])
        if refused:
            return refused
    elif producer is not None and is_layer(producer):
        layer_node = producer
        if _single_path(index, [(x, node)]):
            return Refused(None)  # the float rules say why
    else:
        return Refused(None)
    site = batch_norm_site(ctx, index, node)
    if isinstance(site, Refused):
        return site
    dropped = _dropped_steps(index, node, pair, site.affine) if pair else None
    if dropped is not None and dropped + STEPS_EXACT > STEPS_INEXACT:
        return Refused("dropping %s -> %s would move its output by up to %.2f steps of the quantizer after it, "
                       "beyond the %g-step tolerance" % (describe(index, pair[0]), describe(index, pair[1]), dropped,
                                                        STEPS_INEXACT))
    found = quantized_weight(index, layer_node)
    if found is None:
        if pair is None:
            return Refused(None)
        match = _float_through(ctx, index, layer_node, site, pair)
    elif isinstance(found, str):
        return Refused("%s cannot take the map: %s" % (describe(index, layer_node), found))
    else:
        match = _quantized_match(ctx, index, layer_node, site, found, pair)
    if isinstance(match, QuantizedMatch) and dropped is not None:
        match.plan.dropped_steps = dropped
        match.reason = _reason(index, layer_node, match.plan, pair)
    return match


def _float_through(ctx, index, layer_node, site, pair):
    """A float layer before the dropped pair: the float fold, with the pair removed too."""
    layer = read_layer(ctx, index, layer_node)
    if isinstance(layer, Refused):
        return layer
    if layer.bias_add is not None or site.affine.channels != layer.out_channels:
        return Refused("%s does not match the map's %d channels" % (describe(index, layer_node), site.affine.channels))
    absorption = absorb_into(layer, site.affine, forward=False)
    if isinstance(absorption, Refused):
        return absorption
    plan = QuantizedFold(layer=index.label(layer_node), weight="float", granularity="", channels=layer.out_channels,
                         negated=[], requantized=[], weight_steps=0.0, bias="float", bias_steps=0.0, through_qdq=True)
    return QuantizedMatch(site, _reason(index, layer_node, plan, pair), into=layer.op_type, absorption=absorption,
                          layer_node=layer_node, pair=pair, plan=plan)


def _quantized_match(ctx, index, layer_node, site, found, pair):
    dq, weight = found
    what = describe(index, layer_node)
    attributes = node_attributes(layer_node)
    shape = weight.integers.shape
    channels = LAYER_KINDS[layer_node.op_type].channels(shape, attributes)
    if isinstance(channels, str):
        return Refused("%s %s" % (what, channels))
    rank, _, out_channels = channels
    if out_channels != site.affine.channels:
        return Refused("it has %d channels, %s outputs %d" % (site.affine.channels, what, out_channels))
    if layer_node.op_type == "MatMul" and rank_of(ctx, index, layer_node.input[0]) != 2:
        return Refused("%s's input is not known to be 2-D, so axis 1 is not its feature axis" % what)
    bias = None
    bias_name = layer_node.input[2] if len(layer_node.input) > 2 else ""
    if bias_name:
        bias = float_constant(index, bias_name)
        if bias is None:
            return Refused("%s's bias %r is not a constant" % (what, bias_name))
    stand_in = Layer(node=layer_node, weight=Constant(weight.dequantized(), TensorProto.DOUBLE), attributes=attributes,
                     rank=rank, in_channels=channels[1], out_channels=out_channels, output=layer_node.output[0],
                     bias=None if bias is None else Constant(bias.array.astype(np.float64), bias.elem_type),
                     bias_position=None if layer_node.op_type == "MatMul" else 2)
    absorption = absorb_into(stand_in, site.affine, forward=False)
    if isinstance(absorption, Refused):
        return absorption
    out_axis, channel_of = _output_layout(layer_node.op_type, shape, attributes)
    per_axis = ctx.opset >= PER_AXIS_OPSET
    try:
        rescaled = rescale(weight, site.affine.scale, out_axis, channel_of, per_axis=per_axis,
                           max_steps=MAX_REQUANTIZE_STEPS)
    except ValueError as error:
        before = "" if per_axis else ("DequantizeLinear before opset 13 has one scale per tensor (the model is "
                                      "opset %d), so " % ctx.opset)
        return Refused("folding into the quantized weight of %s is not exact: %s%s" % (what, before, error))
    match = QuantizedMatch(site, "", into=layer_node.op_type, layer_node=layer_node,
                           weight_node=dq, rescaled=rescaled, weight_type=weight.elem_type, pair=pair or (),
                           beta=absorption.beta)
    new_bias = np.asarray(absorption.bias, dtype=np.float64)
    bias_kind, bias_steps = "float", 0.0
    bias_producer = index.producer.get(bias_name) if bias_name else None
    input_scale = _input_scale(index, layer_node)
    wants_int32 = is_dequantize(bias_producer) or (bias is None and input_scale is not None)
    if wants_int32 and input_scale is not None and layer_node.op_type != "MatMul" and new_bias.size == out_channels:
        try:
            slot_scales = rescaled.scale[_slot_of_channel(layer_node.op_type, shape, attributes)] \
                if rescaled.axis is not None else rescaled.scale
            match.bias_int32 = requantize_bias(new_bias, input_scale, slot_scales)
            bias_kind, bias_steps = "int32", match.bias_int32[2]
        except ValueError:
            match.bias_int32 = None
    if match.bias_int32 is None:
        match.bias_values = new_bias
        match.bias_type = bias.elem_type if bias is not None and not is_dequantize(bias_producer) else TensorProto.FLOAT
    if weight.axis is not None:
        granularity = "per-channel"
    else:
        granularity = "per-tensor -> per-channel" if per_axis else "per-tensor"
    match.plan = QuantizedFold(layer=index.label(layer_node), weight=_type_name(weight.elem_type),
                               granularity=granularity, channels=out_channels, negated=rescaled.negated,
                               requantized=rescaled.requantized, weight_steps=rescaled.max_steps, bias=bias_kind,
                               bias_steps=bias_steps, through_qdq=bool(pair))
    match.reason = _reason(index, layer_node, match.plan, pair)
    return match


def _reason(index, layer_node, plan, pair):
    where = "folded into the %s of %s" % ("weights" if plan.weight == "float" else "weight scales",
                                          describe(index, layer_node))
    if pair:
        where += " through %s -> %s, which were dropped (one rounding step fewer)" % (
            describe(index, pair[0]), describe(index, pair[1]))
    return "%s (%s)" % (where, plan.describe())


def _dequantize(ctx, index, anchor, inputs, axis, hint):
    """A new DequantizeLinear of new constants [(array, elem_type), ...] inserted after `anchor`."""
    names = [index.add_constant(array, elem_type, "%s_%s" % (hint, part))
             for (array, elem_type), part in zip(inputs, ("quantized", "scale", "zero_point"))]
    output = ctx.names.fresh(hint)
    attributes = {"axis": axis} if axis is not None else {}
    index.insert_after(anchor, index.new_node(DEQUANTIZE, names, [output], hint + "_dequantize", **attributes))
    return output


def quantized_apply(ctx, index, node, match):
    site = match.site
    for site_node in site.nodes:
        index.remove(site_node)
    for pair_node in match.pair:
        index.remove(pair_node)
    if match.rescaled is None:
        writer = write_absorption(ctx, index, match.absorption)
    else:
        writer = _write_quantized(ctx, index, match)
    index.set_output(writer, 0, site.output)
    ctx.outcome(index, node, action="folded", into=match.into, direction="backward", reason=match.reason,
                quantized=match.plan)


def _write_quantized(ctx, index, match):
    layer_node, dq, rescaled = match.layer_node, match.weight_node, match.rescaled
    label = index.label(layer_node)
    weight_inputs = [(rescaled.integers, match.weight_type), (rescaled.scale, TensorProto.FLOAT)]
    if rescaled.zero_point is not None:
        zp_type = index.constant(dq.input[2]).elem_type
        weight_inputs.append((rescaled.zero_point, zp_type))
    index.set_input(layer_node, 1, _dequantize(ctx, index, dq, weight_inputs, rescaled.axis, label + "_folded_weight"))
    if match.beta is not None and (match.beta != 1.0 or "beta" in node_attributes(layer_node)):
        set_float_attribute(layer_node, "beta", match.beta)
    if match.bias_int32 is not None:
        integers, scales, _ = match.bias_int32
        per_axis = rescaled.axis is not None
        scale = scales if per_axis else scales[:1].reshape(())
        inputs = [(integers, TensorProto.INT32), (scale, TensorProto.FLOAT),
                  (np.zeros(np.shape(scale), dtype=np.int32), TensorProto.INT32)]
        bias = _dequantize(ctx, index, dq, inputs, 0 if per_axis else None, label + "_folded_bias")
        index.set_input(layer_node, 2, bias)
        return layer_node
    values = match.bias_values
    if layer_node.op_type != "MatMul":
        index.set_input(layer_node, 2, index.add_constant(values, match.bias_type, label + "_folded_bias"))
        return layer_node
    if not np.any(values):
        return layer_node
    output = layer_node.output[0]
    index.set_output(layer_node, 0, ctx.names.fresh(output + "_unbiased"))
    bias = index.add_constant(values, match.bias_type, label + "_folded_bias")
    add = index.new_node("Add", [layer_node.output[0], bias], [output], label + "_bias")
    index.insert_after(layer_node, add)
    return add


def default_step_tolerance(outcomes):
    """The verification tolerance, in quantization steps of an output: 1 when every fold into a quantized
    layer was exact, 3 when one dropped a rounding step or requantized a channel."""
    plans = [o.quantized for o in outcomes if getattr(o, "quantized", None) is not None]
    return STEPS_EXACT if all(plan.exact for plan in plans) else STEPS_INEXACT
