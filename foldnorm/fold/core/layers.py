"""The layers that absorb a per-channel map: Conv, ConvTranspose, Gemm and MatMul.

Each layer kind is one `LayerKind` in LAYER_KINDS: how to read its channels from its weight, how to fold a
map on its output into it (backward), how to fold a map on its input into it (forward), and what keeps a
forward fold from being exact. Adding a layer kind means adding one entry here (and its arithmetic in
foldnorm.fold.core.absorb); the rules and the report take it from the table.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import absorb
from .context import Refused, describe, float_constant, rank_of
from .graph_index import GraphIndex
from ..io.proto import is_default_domain, node_attributes, set_float_attribute
from .sites import elementwise_operands


@dataclass
class Layer:
    """A Conv, ConvTranspose, Gemm or MatMul with constant weights, seen as an absorber.

    bias: its bias (Conv/ConvTranspose input 2, Gemm's C, or the constant of the Add that follows a MatMul,
    held by bias_add at input bias_position); output: the value the layer, bias Add included, writes.
    """

    node: object
    weight: object
    attributes: dict
    rank: int
    in_channels: int
    out_channels: int
    output: str
    bias: object = None
    bias_add: object = None
    bias_position: int | None = 2

    @property
    def op_type(self):
        return self.node.op_type

    @property
    def kind(self):
        return LAYER_KINDS[self.node.op_type]


@dataclass
class Absorption:
    """The new parameters of one layer once it has absorbed a map (beta: Gemm's new beta, or None)."""

    layer: Layer
    weight: np.ndarray
    bias: np.ndarray
    beta: float | None = None


@dataclass(frozen=True)
class LayerKind:
    """One kind of absorbing layer.

    channels(weight_shape, attributes) -> (rank, in_channels, out_channels) or a reason string;
    backward / forward(layer, affine) -> (weight, bias, beta) with the map folded in (ValueError when that
    is not exact); forward_refusal(layer) -> why a map on the input cannot be folded exactly, or None;
    output_axis / input_axis(layer) -> the axis of its output / input tensor that its weight indexes.
    """

    op_type: str
    channels: Callable
    backward: Callable
    forward: Callable
    forward_refusal: Callable
    output_axis: Callable = lambda layer: 1
    input_axis: Callable = lambda layer: 1


def _group(layer):
    return int(layer.attributes.get("group", 1))


def _conv_channels(shape, attributes, transposed):
    group = int(attributes.get("group", 1))
    if len(shape) < 3 or group < 1:
        return "has a weight of shape %s" % (shape,)
    if transposed:
        return len(shape), shape[0], shape[1] * group
    return len(shape), shape[1] * group, shape[0]


def _padding_refusal(layer):
    attributes = layer.attributes
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return "pads its input (auto_pad=%s), and padding zeros would not be shifted" % auto_pad
    pads = attributes.get("pads", [])
    if auto_pad == "NOTSET" and any(pads):
        return "pads its input (pads=%s), and padding zeros would not be shifted" % list(pads)
    if layer.op_type == "ConvTranspose":
        if any(attributes.get("output_padding", [])) or "output_shape" in attributes:
            return "pads or crops its output (output_padding/output_shape)"
    return None


def _matrix_channels(shape, attributes, trans_b):
    if len(shape) != 2:
        return "has a %d-D weight; only a 2-D weight has one feature axis" % len(shape)
    k, n = (shape[1], shape[0]) if trans_b(attributes) else shape
    return 2, k, n


def _gemm_args(layer):
    attributes = layer.attributes
    return attributes.get("alpha", 1.0), attributes.get("beta", 1.0), attributes.get("transB", 0)


def _with_beta(result, beta=None):
    weight, bias, *rest = result
    return weight, bias, rest[0] if rest else beta


LAYER_KINDS = {
    "Conv": LayerKind(
        "Conv",
        channels=lambda shape, attributes: _conv_channels(shape, attributes, transposed=False),
        backward=lambda layer, a: _with_beta(absorb.fold_into_conv(_w(layer), _b(layer), a, _group(layer))),
        forward=lambda layer, a: _with_beta(absorb.fold_forward_into_conv(_w(layer), _b(layer), a, _group(layer))),
        forward_refusal=_padding_refusal,
    ),
    "ConvTranspose": LayerKind(
        "ConvTranspose",
        channels=lambda shape, attributes: _conv_channels(shape, attributes, transposed=True),
        backward=lambda layer, a: _with_beta(absorb.fold_into_conv_transpose(_w(layer), _b(layer), a,
                                                                             _group(layer))),
        forward=lambda layer, a: _with_beta(absorb.fold_forward_into_conv_transpose(
            _w(layer), _b(layer), a, _group(layer),
            strides=layer.attributes.get("strides", [1] * (layer.rank - 2)))),
        forward_refusal=_padding_refusal,
    ),
    "Gemm": LayerKind(
        "Gemm",
        channels=lambda shape, attributes: _matrix_channels(shape, attributes, lambda a: a.get("transB", 0)),
        backward=lambda layer, a: absorb.fold_into_gemm(_w(layer), _b(layer), a, *_gemm_args(layer)),
        forward=lambda layer, a: absorb.fold_forward_into_gemm(_w(layer), _b(layer), a, *_gemm_args(layer)),
        forward_refusal=lambda layer: None,
        input_axis=lambda layer: 0 if layer.attributes.get("transA", 0) else 1,  # A is (K, M) when transposed
    ),
    "MatMul": LayerKind(
        "MatMul",
        channels=lambda shape, attributes: _matrix_channels(shape, attributes, lambda a: False),
        backward=lambda layer, a: _with_beta(absorb.fold_into_matmul(_w(layer), _b(layer), a)),
        forward=lambda layer, a: _with_beta(absorb.fold_forward_into_matmul(_w(layer), _b(layer), a)),
        forward_refusal=lambda layer: None,
        output_axis=lambda layer: layer.rank - 1,
        input_axis=lambda layer: layer.rank - 1,
    ),
}


def _w(layer):
    return layer.weight.array


def _b(layer):
    return layer.bias.array if layer.bias is not None else None


def is_layer(node):
    return node.op_type in LAYER_KINDS and is_default_domain(node)


def read_layer(ctx, index: GraphIndex, node):
    """The node as a Layer (constant weights), or Refused with the reason it cannot absorb a map."""
    what = describe(index, node)
    if not is_layer(node):
        return Refused("%s cannot absorb a per-channel map" % what)
    if len(node.input) < 2:
        return Refused("%s has no weight input" % what)
    weight_producer = index.producer.get(node.input[1])
    if weight_producer is not None and weight_producer.op_type == "DequantizeLinear":  # foldnorm.fold.quantized
        return Refused("%s's weight %r is quantized (DequantizeLinear): only a BatchNormalization on its output "
                       "folds into it, through the weight's scales" % (what, node.input[1]))
    weight = float_constant(index, node.input[1])
    if weight is None:
        return Refused("%s's weight %s" % (what, _not_constant(index, node.input[1])))
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = float_constant(index, node.input[2])
        if bias is None:
            return Refused("%s's bias %s" % (what, _not_constant(index, node.input[2])))
    attributes = node_attributes(node)
    channels = LAYER_KINDS[node.op_type].channels(weight.array.shape, attributes)
    if isinstance(channels, str):
        return Refused("%s %s" % (what, channels))
    rank, in_channels, out_channels = channels
    layer = Layer(node=node, weight=weight, bias=bias, attributes=attributes, rank=rank,
                  in_channels=in_channels, out_channels=out_channels, output=node.output[0])
    if node.op_type == "MatMul":
        return _read_matmul(ctx, index, layer, what)
    return layer


def _not_constant(index, name):
    too_large = index.too_large(name)
    if too_large is not None:
        return "is not evaluated: %s" % too_large
    return "%r is not a float constant" % name


def _read_matmul(ctx, index, layer, what):
    """A MatMul with a constant 2-D weight absorbs along the last axis of its input and output, which have
    the input's rank; an Add of a constant row after it is its bias."""
    node = layer.node
    input_rank = rank_of(ctx, index, node.input[0])
    if input_rank is None:
        return Refused("the rank of %s's input %r is unknown" % (what, node.input[0]))
    if input_rank < 2:
        return Refused("%s reads a %d-D input" % (what, input_rank))
    layer.rank = input_rank
    layer.bias_position = None
    add = index.only_reader(node.output[0])
    if add is not None and add.op_type == "Add":
        found = _row_bias_operand(index, add, node.output[0], layer.out_channels)
        if found is not None:
            layer.bias, layer.bias_position = found
            layer.bias_add, layer.output = add, add.output[0]
    return layer


def _row_bias_operand(index, add, matmul_output, columns):
    """(constant, position) when `add` adds a constant bias along the columns of a 2-D MatMul output."""
    if len(add.input) != 2 or not is_default_domain(add):
        return None
    position = 1 if add.input[0] == matmul_output else 0 if add.input[1] == matmul_output else None
    if position is None or add.input[position] == matmul_output:
        return None
    bias = float_constant(index, add.input[position])
    if bias is None or bias.array.ndim > 2 or (bias.array.ndim and bias.array.shape[-1] not in (1, columns)):
        return None
    return bias, position


def producing_layer(ctx, index, value):
    """The Layer whose output `value` is, when the map on `value` may be folded back into it."""
    node = index.producer.get(value)
    if node is None:
        where = "a graph input" if value in index.graph_inputs else "a constant or an outer-scope value"
        return Refused("its input %r is %s" % (value, where))
    if index.is_graph_output(value):
        return Refused("its input %r is also a graph output" % value)
    readers = len(index.value_readers(value))  # a Shape or Size of it reads no value the fold changes
    if readers != 1:
        return Refused("its input %r has %d readers" % (value, readers))
    if node.op_type == "Add" and is_default_domain(node):
        operands = elementwise_operands(index, node)
        matmul = index.producer.get(operands[0]) if operands else None
        if matmul is not None and matmul.op_type == "MatMul" and is_default_domain(matmul):
            layer = read_layer(ctx, index, matmul)
            if isinstance(layer, Layer) and layer.bias_add is node:
                return layer
    if not is_layer(node):
        return Refused("its input comes from %s, which cannot absorb a per-channel map" % describe(index, node))
    return read_layer(ctx, index, node)


def absorb_into(layer, affine, *, forward):
    """The layer's new parameters with the map folded in, or Refused when that is not exact."""
    kind = layer.kind
    try:
        weight, bias, beta = (kind.forward if forward else kind.backward)(layer, affine)
    except (ValueError, TypeError) as error:
        return Refused("folding into %s is not exact: %s" % (layer.op_type, error))
    return Absorption(layer=layer, weight=weight, bias=bias, beta=beta)


def axis_refusal(index, layer, axis, *, forward):
    """Why a map whose channels lie on `axis` of the layer's input (forward) or output does not reach the
    features its weight indexes; None when it does."""
    feature_axis = (layer.kind.input_axis if forward else layer.kind.output_axis)(layer)
    if axis == feature_axis:
        return None
    side = "input" if forward else "output"
    if layer.op_type == "Gemm" and forward and layer.attributes.get("transA", 0):
        side = "input, which it reads transposed (transA=1),"
    return ("its channels are on axis %d of %s's %d-D %s, whose features are on axis %d"
            % (axis, describe(index, layer.node), layer.rank, side, feature_axis))


def forward_refusal(index, layer):
    """Why the layer cannot take a map on its input exactly, in words; None when it can."""
    reason = layer.kind.forward_refusal(layer)
    return None if reason is None else "%s %s" % (describe(index, layer.node), reason)


def write_absorption(ctx, index, absorption):
    """Give the layer its new parameters (new constants, fresh names); returns the node that now writes
    the layer's output (the layer, or the Add of its bias)."""
    layer = absorption.layer
    node = layer.node
    label = index.label(node)
    weight_type = layer.weight.elem_type
    bias_type = layer.bias.elem_type if layer.bias is not None else weight_type
    index.set_input(node, 1, index.add_constant(absorption.weight, weight_type, "%s_folded_weight" % label))
    if layer.op_type == "Gemm" and absorption.beta is not None and "beta" in layer.attributes:
        set_float_attribute(node, "beta", absorption.beta)
    if layer.op_type != "MatMul":
        bias = index.add_constant(absorption.bias, bias_type, "%s_folded_bias" % label)
        index.set_input(node, 2, bias)
        return node
    if layer.bias_add is not None:
        bias = index.add_constant(absorption.bias, bias_type, "%s_folded_bias" % label)
        index.set_input(layer.bias_add, layer.bias_position, bias)
        return layer.bias_add
    if absorption.bias is None or not np.any(absorption.bias):
        return node
    output = node.output[0]
    index.set_output(node, 0, ctx.names.fresh(output + "_unbiased"))
    bias = index.add_constant(absorption.bias, bias_type, "%s_folded_bias" % label)
    add = index.new_node("Add", [node.output[0], bias], [output], "%s_bias" % label)
    index.insert_after(node, add)
    return add
