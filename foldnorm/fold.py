"""The fold pass: fold frozen BatchNormalization (and per-channel Mul/Add/Sub/Div) into neighbouring layers.

Every inference-mode BatchNormalization, and every Mul/Add/Sub/Div by a constant that varies only along
the channel axis, is a per-channel affine map (foldnorm.affine.ChannelAffine). The pass first reads each
such node as a `Site` holding that map, then lets a neighbouring linear layer absorb it
(foldnorm.absorb). Each way of folding is a small rule with a `condition` (may it fire here? It returns a
match, or a `Refused` with the reason) and an `apply` (the rewrite); the rules are listed in one table,
RULES, tried in that order on every node by one loop, which runs on the main graph and on every
If/Loop/Scan subgraph. A BatchNormalization no rule folds becomes one Mul and one Add (unless keep_bn);
one in training mode, or with parameters computed at run time, is left exactly as it is.

The loop visits each node once in topological order and every edit goes through foldnorm.graph's index,
so the pass is linear in the size of the model.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import absorb
from .affine import ELEMENTWISE_OPS, ChannelAffine, affine_from_batch_norm, affine_from_elementwise
from .errors import FoldError, VerificationError
from .graph import (FLOAT_TYPES, GraphIndex, NameScope, attribute_graphs, default_opset, graph_statistics,
                    is_default_domain, node_attributes, numpy_dtype, remove_unused, set_float_attribute,
                    value_types)
from .report import FoldReport, NodeOutcome

BATCH_NORM = "BatchNormalization"
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MIN_OPSET = 7
CHANNEL_AXIS = 1
_PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Refused:
    """Why a rule does not fire. reason None: the rule does not apply here at all (nothing to report).
    final: the node cannot be folded nor rewritten by any rule; it is left exactly as it is."""

    reason: str | None
    final: bool = False


@dataclass
class Site:
    """A per-channel affine map in the graph: its nodes (a BN or a Mul/Add/Sub/Div, possibly followed by
    per-channel Mul/Add/Sub/Div), the value it reads and the value it writes."""

    nodes: list
    affine: ChannelAffine
    input: str
    output: str


@dataclass
class Layer:
    """A Conv, ConvTranspose, Gemm or MatMul with constant weights, seen as an absorber.

    bias: its bias (Conv/ConvTranspose input 2, Gemm's C, or the constant of the Add that follows a MatMul,
    held by bias_add at input bias_position); output: the value the layer, bias Add included, writes.
    """

    node: object
    weight: object
    bias: object
    bias_add: object
    bias_position: int
    attributes: dict
    rank: int
    in_channels: int
    out_channels: int
    output: str

    @property
    def op_type(self):
        return self.node.op_type


@dataclass
class Absorption:
    """The new parameters of one layer: (weight, bias, beta) as the absorber returned them."""

    layer: Layer
    weight: np.ndarray
    bias: np.ndarray
    beta: float | None


@dataclass
class Match:
    site: Site
    absorptions: list
    into: str
    reason: str
    joint: object = None   # the Add/Sum/Concat whose branches absorbed the map
    replacement: tuple = ()  # (mul, add) constants of a rewrite


@dataclass(frozen=True)
class Rule:
    """One way of folding: condition(ctx, index, node) -> Match | Refused, apply(ctx, index, node, match).
    A fallback rule fires only when the folds before it refused; its outcome lists their reasons."""

    name: str
    op_types: tuple
    condition: object
    apply: object
    fallback: bool = False


class FoldContext:
    """What one run of the pass shares across graphs: options, value types, names, outcomes."""

    def __init__(self, model, opset, keep_bn):
        self.opset = opset
        self.keep_bn = keep_bn
        self.types = value_types(model)
        self.names = NameScope(model)
        self.ir_version = model.ir_version
        self.outcomes = []
        self.indexes = []
        self.sites = {}

    def outcome(self, index, node, action, into, reason):
        self.outcomes.append(NodeOutcome(index.label(node), node.op_type, index.path, action, into, reason))


# ---------------------------------------------------------------------- reading the graph


def _describe(index, node):
    return "%s %r" % (node.op_type, index.label(node))


def _shape(ctx, index, name):
    known = ctx.types.get(name)
    if known is not None and known[1] is not None:
        return known[1]
    value = index.constant(name)
    if value is not None:
        return value.array.shape
    node = index.producer.get(name)
    if node is not None and node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        weight = index.constant(node.input[1])
        if weight is not None:
            return (None,) * weight.array.ndim
    return None


def _rank(ctx, index, name):
    shape = _shape(ctx, index, name)
    return None if shape is None else len(shape)


def _elem_type(ctx, name):
    known = ctx.types.get(name)
    return known[0] if known is not None and known[0] else None


def _float_constant(index, name):
    value = index.constant(name)
    if value is None or value.elem_type not in FLOAT_TYPES:
        return None
    return value


def batch_norm_site(ctx, index, node):
    """The Site of a BatchNormalization, or a final Refused saying why it must stay as it is."""
    key = id(node)
    if key not in ctx.sites:
        ctx.sites[key] = _batch_norm_site(ctx, index, node)
    return ctx.sites[key]


def _batch_norm_site(ctx, index, node):
    attributes = node_attributes(node)
    if ctx.opset >= 14 and attributes.get("training_mode", 0):
        return Refused("training_mode=1: it normalizes with the batch's own statistics", final=True)
    extra = [name for name in node.output[1:] if name]
    if ctx.opset < 14 and extra:
        return Refused("it has running-statistics outputs, which before opset 14 means training mode", final=True)
    used = [name for name in extra if index.is_read(name)]
    if used:
        return Refused("its running-statistics output %s is used" % ", ".join(repr(n) for n in used), final=True)
    if len(node.input) < 5:
        return Refused("it has %d inputs instead of 5" % len(node.input), final=True)
    params = {}
    for role, name in zip(("scale", "bias", "mean", "var"), node.input[1:5]):
        value = _float_constant(index, name)
        if value is None:
            return Refused(_not_constant_reason(index, role, name), final=True)
        params[role] = value.array
    if ctx.opset < 9 and attributes.get("spatial", 1) == 0:
        shapes = {p.shape for p in params.values()}
        if any(len(shape) != 1 for shape in shapes):
            return Refused("spatial=0 with per-element parameters of shape %s: one value per position, not "
                           "per channel" % (sorted(shapes)[0],), final=True)
    try:
        affine = affine_from_batch_norm(params["scale"], params["bias"], params["mean"], params["var"],
                                        attributes.get("epsilon", 1e-5))
    except ValueError as error:
        return Refused("its parameters do not form a finite per-channel map (%s)" % error, final=True)
    channels = (_shape(ctx, index, node.input[0]) or (None, None))[1:2]
    if channels and channels[0] is not None and channels[0] != affine.channels:
        return Refused("its input has %d channels but its parameters %d" % (channels[0], affine.channels),
                       final=True)
    return Site([node], affine, node.input[0], node.output[0])


def elementwise_operands(index, node):
    """(x, constant, constant_is_first) of a Mul/Add/Sub/Div with exactly one constant operand, or None."""
    if len(node.input) != 2:
        return None
    first, second = index.constant(node.input[0]), index.constant(node.input[1])
    if (first is None) == (second is None):
        return None
    if second is not None:
        return node.input[0], second, False
    return node.input[1], first, True


def site_input(index, node):
    if node.op_type == BATCH_NORM:
        return node.input[0] if node.input else None
    operands = elementwise_operands(index, node)
    return operands[0] if operands else None


def elementwise_site(ctx, index, node, rank, channels):
    operands = elementwise_operands(index, node)
    if operands is None:
        return Refused(None)
    x, constant, constant_is_first = operands
    if rank is None or channels is None:
        return Refused("the shape of its input %r is unknown" % x)
    affine = affine_from_elementwise(node.op_type, constant.array, constant_is_first, CHANNEL_AXIS, rank, channels)
    if affine is None:
        return Refused("its constant of shape %s is not a per-channel map on a rank-%d tensor with %d channels "
                       "(a (C,) constant broadcasts along the last axis)" % (constant.array.shape, rank, channels))
    return Site([node], affine, x, node.output[0])


def site_of(ctx, index, node, rank, channels):
    if node.op_type == BATCH_NORM:
        return batch_norm_site(ctx, index, node)
    return elementwise_site(ctx, index, node, rank, channels)


def extend_chain(ctx, index, site):
    """The site followed by the per-channel Mul/Add/Sub/Div that are each the only reader of the last."""
    shape = _shape(ctx, index, site.input)
    if shape is None or len(shape) < 2:
        return site
    rank, channels = len(shape), site.affine.channels
    nodes, affine, output = list(site.nodes), site.affine, site.output
    while True:
        reader = index.only_reader(output)
        if reader is None or reader.op_type not in ELEMENTWISE_OPS or not is_default_domain(reader):
            break
        operands = elementwise_operands(index, reader)
        if operands is None or operands[0] != output:
            break
        following = elementwise_site(ctx, index, reader, rank, channels)
        if isinstance(following, Refused):
            break
        nodes.append(reader)
        affine = affine.then(following.affine)
        output = following.output
    return Site(nodes, affine, site.input, output)


def _row_bias_operand(index, add, matmul_output, columns):
    """(constant, position) when `add` adds a constant bias along the columns of a 2-D MatMul output."""
    if len(add.input) != 2 or not is_default_domain(add):
        return None
    position = 1 if add.input[0] == matmul_output else 0 if add.input[1] == matmul_output else None
    if position is None or add.input[position] == matmul_output:
        return None
    bias = _float_constant(index, add.input[position])
    if bias is None or bias.array.ndim > 2 or (bias.array.ndim and bias.array.shape[-1] not in (1, columns)):
        return None
    return bias, position


def read_layer(ctx, index, node):
    """The node as a Layer (constant weights), or Refused with the reason it cannot absorb a map."""
    what = _describe(index, node)
    if node.op_type not in LAYER_OPS or not is_default_domain(node):
        return Refused("%s cannot absorb a per-channel map" % what)
    if len(node.input) < 2:
        return Refused("%s has no weight input" % what)
    weight = _float_constant(index, node.input[1])
    if weight is None:
        return Refused("%s's weight %r is not a float constant" % (what, node.input[1]))
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = _float_constant(index, node.input[2])
        if bias is None:
            return Refused("%s's bias %r is not a float constant" % (what, node.input[2]))
    attributes = node_attributes(node)
    shape = weight.array.shape
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        group = int(attributes.get("group", 1))
        if len(shape) < 3 or group < 1:
            return Refused("%s has a weight of shape %s" % (what, shape))
        if op == "Conv":
            in_channels, out_channels = shape[1] * group, shape[0]
        else:
            in_channels, out_channels = shape[0], shape[1] * group
        return Layer(node, weight, bias, None, 2, attributes, len(shape), in_channels, out_channels, node.output[0])
    if len(shape) != 2:
        return Refused("%s has a %d-D weight; only a 2-D weight has one feature axis" % (what, len(shape)))
    if op == "Gemm":
        k, n = (shape[1], shape[0]) if attributes.get("transB", 0) else shape
        return Layer(node, weight, bias, None, 2, attributes, 2, k, n, node.output[0])
    rank = _rank(ctx, index, node.input[0])
    if rank is None:
        return Refused("the rank of %s's input %r is unknown" % (what, node.input[0]))
    if rank != 2:
        return Refused("%s's output is %d-D, so axis 1 is not its feature axis" % (what, rank))
    layer = Layer(node, weight, None, None, None, attributes, 2, shape[0], shape[1], node.output[0])
    add = index.only_reader(node.output[0])
    if add is not None and add.op_type == "Add":
        found = _row_bias_operand(index, add, node.output[0], shape[1])
        if found is not None:
            layer.bias, layer.bias_position = found
            layer.bias_add, layer.output = add, add.output[0]
    return layer


def producing_layer(ctx, index, value):
    """The Layer whose output `value` is, when the map on `value` may be folded back into it."""
    node = index.producer.get(value)
    if node is None:
        where = "a graph input" if value in index.graph_inputs else "a constant or an outer-scope value"
        return Refused("its input %r is %s" % (value, where))
    if index.is_graph_output(value):
        return Refused("its input %r is also a graph output" % value)
    readers = len(index.readers(value))
    if readers != 1:
        return Refused("its input %r has %d readers" % (value, readers))
    if node.op_type == "Add" and is_default_domain(node):
        operands = elementwise_operands(index, node)
        matmul = index.producer.get(operands[0]) if operands else None
        if matmul is not None and matmul.op_type == "MatMul" and is_default_domain(matmul):
            layer = read_layer(ctx, index, matmul)
            if isinstance(layer, Layer) and layer.bias_add is node:
                return layer
    if node.op_type not in LAYER_OPS or not is_default_domain(node):
        return Refused("its input comes from %s, which cannot absorb a per-channel map" % _describe(index, node))
    return read_layer(ctx, index, node)


def absorb_into(layer, affine, forward):
    """The layer's new parameters with the map folded in, or Refused when that is not exact."""
    attributes = layer.attributes
    weight = layer.weight.array
    bias = layer.bias.array if layer.bias is not None else None
    try:
        if layer.op_type == "Conv":
            fold = absorb.fold_forward_into_conv if forward else absorb.fold_into_conv
            return Absorption(layer, *fold(weight, bias, affine, int(attributes.get("group", 1))), None)
        if layer.op_type == "ConvTranspose":
            group = int(attributes.get("group", 1))
            if forward:
                strides = attributes.get("strides", [1] * (layer.rank - 2))
                result = absorb.fold_forward_into_conv_transpose(weight, bias, affine, group, strides=strides)
            else:
                result = absorb.fold_into_conv_transpose(weight, bias, affine, group)
            return Absorption(layer, *result, None)
        if layer.op_type == "Gemm":
            fold = absorb.fold_forward_into_gemm if forward else absorb.fold_into_gemm
            return Absorption(layer, *fold(weight, bias, affine, attributes.get("alpha", 1.0),
                                           attributes.get("beta", 1.0), attributes.get("transB", 0)))
        fold = absorb.fold_forward_into_matmul if forward else absorb.fold_into_matmul
        return Absorption(layer, *fold(weight, bias, affine), None)
    except (ValueError, TypeError) as error:
        return Refused("folding into %s is not exact: %s" % (layer.op_type, error))


# ---------------------------------------------------------------------- writing the graph


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


def remove_site(index, site):
    for node in site.nodes:
        index.remove(node)


def record(ctx, index, match, action):
    first, *merged = match.site.nodes
    ctx.outcome(index, first, action, match.into if action == "folded" else None, match.reason)
    for node in merged:
        into = match.into if action == "folded" else "Mul/Add"
        ctx.outcome(index, node, "folded", into, "merged with %s, which it follows" % _describe(index, first))


# ---------------------------------------------------------------------- the rules


def backward_condition(ctx, index, node):
    """Fold the map into the layer that produces its input (that layer feeds nothing else)."""
    x = site_input(index, node)
    if x is None:
        return Refused(None)
    layer = producing_layer(ctx, index, x)
    if isinstance(layer, Refused):
        return layer
    if layer.bias_add is node or (node.op_type == "Add" and layer.op_type == "MatMul" and layer.bias_add is None):
        return Refused(None)  # it is the MatMul's own bias
    site = site_of(ctx, index, node, layer.rank, layer.out_channels)
    if isinstance(site, Refused):
        return site
    if site.affine.channels != layer.out_channels:
        return Refused("it has %d channels, %s outputs %d"
                       % (site.affine.channels, _describe(index, layer.node), layer.out_channels))
    absorption = absorb_into(layer, site.affine, forward=False)
    if isinstance(absorption, Refused):
        return absorption
    return Match(site, [absorption], layer.op_type,
                 "folded into the weights of %s, its producer" % _describe(index, layer.node))


def backward_apply(ctx, index, node, match):
    remove_site(index, match.site)
    writer = write_absorption(ctx, index, match.absorptions[0])
    index.set_output(writer, 0, match.site.output)
    record(ctx, index, match, "folded")


def _branch_layers(ctx, index, joint):
    layers = []
    for name in joint.input:
        if not name or list(joint.input).count(name) > 1:
            return Refused("%s reads %r more than once" % (_describe(index, joint), name))
        layer = producing_layer(ctx, index, name)
        if isinstance(layer, Refused):
            return Refused("%s's branch: %s" % (_describe(index, joint), layer.reason))
        layers.append(layer)
    if len({layer.rank for layer in layers}) != 1:
        return Refused("the branches of %s have different ranks" % _describe(index, joint))
    return layers


def _joint(ctx, index, node, op_types):
    x = site_input(index, node)
    joint = index.producer.get(x) if x else None
    if joint is None or joint.op_type not in op_types or not is_default_domain(joint):
        return None, Refused(None)
    if index.only_reader(x) is None:
        return None, Refused("the output of %s has other readers" % _describe(index, joint))
    return joint, None


def across_add_condition(ctx, index, node):
    """BN(Add(a, b)): scale into every branch's producer, the shift into the first one."""
    joint, refused = _joint(ctx, index, node, ("Add", "Sum"))
    if refused:
        return refused
    layers = _branch_layers(ctx, index, joint)
    if isinstance(layers, Refused):
        return layers
    channels = {layer.out_channels for layer in layers}
    if len(channels) != 1:
        return Refused("the branches of %s have different channel counts" % _describe(index, joint))
    site = site_of(ctx, index, node, layers[0].rank, channels.pop())
    if isinstance(site, Refused):
        return site
    absorptions = []
    for i, layer in enumerate(layers):
        part = site.affine if i == 0 else ChannelAffine(site.affine.scale, np.zeros(site.affine.channels))
        if layer.out_channels != site.affine.channels:
            return Refused("%s outputs %d channels, the map has %d"
                           % (_describe(index, layer.node), layer.out_channels, site.affine.channels))
        absorption = absorb_into(layer, part, forward=False)
        if isinstance(absorption, Refused):
            return absorption
        absorptions.append(absorption)
    return Match(site, absorptions, joint.op_type,
                 "folded across %s into %s" % (_describe(index, joint),
                                               ", ".join(_describe(index, a.layer.node) for a in absorptions)),
                 joint=joint)


def across_concat_condition(ctx, index, node):
    """BN(Concat(a, b, axis=1)): each branch's producer absorbs its own channels of the map."""
    joint, refused = _joint(ctx, index, node, ("Concat",))
    if refused:
        return refused
    layers = _branch_layers(ctx, index, joint)
    if isinstance(layers, Refused):
        return layers
    rank = layers[0].rank
    axis = int(node_attributes(joint).get("axis", 1))
    if not -rank <= axis < rank or axis % rank != CHANNEL_AXIS:
        return Refused("%s joins along axis %d, not the channels" % (_describe(index, joint), axis))
    total = sum(layer.out_channels for layer in layers)
    site = site_of(ctx, index, node, rank, total)
    if isinstance(site, Refused):
        return site
    if site.affine.channels != total:
        return Refused("%s has %d channels, the map %d" % (_describe(index, joint), total, site.affine.channels))
    absorptions, start = [], 0
    for layer in layers:
        part = site.affine.slice(start, start + layer.out_channels)
        start += layer.out_channels
        absorption = absorb_into(layer, part, forward=False)
        if isinstance(absorption, Refused):
            return absorption
        absorptions.append(absorption)
    return Match(site, absorptions, "Concat",
                 "folded across %s, each part into %s" % (
                     _describe(index, joint), ", ".join(_describe(index, a.layer.node) for a in absorptions)),
                 joint=joint)


def across_apply(ctx, index, node, match):
    remove_site(index, match.site)
    for absorption in match.absorptions:
        write_absorption(ctx, index, absorption)
    index.set_output(match.joint, 0, match.site.output)
    record(ctx, index, match, "folded")


def _forward_padding_refusal(index, layer):
    """Why the layer cannot take a shift on its input exactly (None when it can)."""
    attributes = layer.attributes
    what = _describe(index, layer.node)
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return "%s pads its input (auto_pad=%s), and padding zeros would not be shifted" % (what, auto_pad)
    pads = attributes.get("pads", [])
    if auto_pad == "NOTSET" and any(pads):
        return "%s pads its input (pads=%s), and padding zeros would not be shifted" % (what, list(pads))
    if layer.op_type == "ConvTranspose":
        if any(attributes.get("output_padding", [])) or "output_shape" in attributes:
            return "%s pads or crops its output (output_padding/output_shape)" % what
    return None


def _keeps_input_shape(ctx, index, node, layer):
    """Whether a Mul/Add/Sub/Div before `layer` writes a value of its input's shape, so that the layer may
    read the input instead: its constant is a single value, or the input is known to have the layer's
    rank and input channels."""
    x, constant, _ = elementwise_operands(index, node)
    if constant.array.size == 1 and constant.array.ndim <= layer.rank:
        return True
    shape = _shape(ctx, index, x)
    return shape is not None and len(shape) == layer.rank and shape[1] == layer.in_channels


def forward_condition(ctx, index, node):
    """Fold the map into the layer that is the only reader of its output (Conv without padding, Gemm with
    transA=0, 2-D MatMul)."""
    if node.op_type == BATCH_NORM:
        site = batch_norm_site(ctx, index, node)
        if isinstance(site, Refused):
            return site
        site = extend_chain(ctx, index, site)
    else:
        operands = elementwise_operands(index, node)
        if operands is None:
            return Refused(None)
        site = Site([node], None, operands[0], node.output[0])
    reader = index.only_reader(site.output)
    if reader is None:
        count = len(index.readers(site.output))
        return Refused("its output %s" % ("is a graph output" if index.is_graph_output(site.output)
                                          else "has %d readers" % count))
    if reader.op_type not in LAYER_OPS or not is_default_domain(reader) or reader.input[0] != site.output:
        return Refused("its output goes to %s, which cannot absorb a per-channel map on its input"
                       % _describe(index, reader))
    layer = read_layer(ctx, index, reader)
    if isinstance(layer, Refused):
        return layer
    if layer.op_type in ("Conv", "ConvTranspose"):
        refusal = _forward_padding_refusal(index, layer)
        if refusal:
            return Refused(refusal)
    if layer.op_type == "Gemm" and layer.attributes.get("transA", 0):
        return Refused("%s reads its input transposed (transA=1)" % _describe(index, reader))
    if site.affine is None:
        site = elementwise_site(ctx, index, node, layer.rank, layer.in_channels)
        if isinstance(site, Refused):
            return site
        if not _keeps_input_shape(ctx, index, node, layer):
            return Refused("its input %r may have fewer channels than %s reads (the constant would broadcast "
                           "it)" % (site.input, _describe(index, reader)))
    if site.affine.channels != layer.in_channels:
        return Refused("it has %d channels, %s reads %d" % (site.affine.channels, _describe(index, reader),
                                                           layer.in_channels))
    absorption = absorb_into(layer, site.affine, forward=True)
    if isinstance(absorption, Refused):
        return absorption
    return Match(site, [absorption], "forward:" + layer.op_type,
                 "folded forward into the weights of %s, its only reader" % _describe(index, reader))


def forward_apply(ctx, index, node, match):
    site = match.site
    layer = match.absorptions[0].layer
    index.set_input(layer.node, 0, site.input)
    remove_site(index, site)
    write_absorption(ctx, index, match.absorptions[0])
    record(ctx, index, match, "folded")


def rewrite_condition(ctx, index, node):
    """What no rule folded becomes Mul + Add with constants shaped (C, 1, ..., 1), unless keep_bn."""
    if ctx.keep_bn:
        return Refused("kept as BatchNormalization (keep_bn)")
    site = batch_norm_site(ctx, index, node)
    if isinstance(site, Refused):
        return site
    rank = _rank(ctx, index, site.input)
    elem_type = _elem_type(ctx, site.input)
    if elem_type is None and ctx.opset < 15:
        elem_type = index.constant(node.input[1]).elem_type  # X and scale share one type before opset 15
    if rank is None or rank < 2 or elem_type is None:
        return Refused("the rank or type of its input %r is unknown, so it cannot be rewritten as Mul/Add"
                       % site.input)
    site = extend_chain(ctx, index, site)
    try:
        mul, add = absorb.affine_as_mul_add(site.affine, rank, CHANNEL_AXIS, numpy_dtype(elem_type))
    except ValueError as error:
        return Refused("its map does not fit in the input's type: %s" % error)
    return Match(site, [], None, "rewritten as Mul and Add", replacement=(mul, add, elem_type))


def rewrite_apply(ctx, index, node, match):
    site = match.site
    mul, add, elem_type = match.replacement
    label = index.label(node)
    steps = []
    if not np.all(mul == 1):
        steps.append(("Mul", mul))
    if not np.all(add == 0):
        steps.append(("Add", add))
    remove_site(index, site)
    value = site.input
    if not steps:
        index.insert_after(node, index.new_node("Identity", [value], [site.output], label + "_identity"))
    for i, (op_type, constant) in enumerate(steps):
        name = index.add_constant(constant, elem_type, "%s_%s" % (label, op_type.lower()))
        output = site.output if i == len(steps) - 1 else ctx.names.fresh("%s_scaled" % label)
        index.insert_after(node, index.new_node(op_type, [value, name], [output], "%s_%s" % (label, op_type.lower())))
        value = output
    record(ctx, index, match, "rewritten")


NORMALIZATION_AND_ELEMENTWISE = (BATCH_NORM,) + ELEMENTWISE_OPS

RULES = (
    Rule("fold into the producing layer", NORMALIZATION_AND_ELEMENTWISE, backward_condition, backward_apply),
    Rule("fold across Add/Sum", NORMALIZATION_AND_ELEMENTWISE, across_add_condition, across_apply),
    Rule("fold across Concat", NORMALIZATION_AND_ELEMENTWISE, across_concat_condition, across_apply),
    Rule("fold forward into the reading layer", NORMALIZATION_AND_ELEMENTWISE, forward_condition, forward_apply),
    Rule("rewrite as Mul and Add", (BATCH_NORM,), rewrite_condition, rewrite_apply, fallback=True),
)


# ---------------------------------------------------------------------- the driver


def fold_graph(ctx, index):
    """Run the rules on every node of one graph, then on each of its subgraphs."""
    ctx.indexes.append(index)
    for node in list(index.nodes):
        if index.is_removed(node) or not is_default_domain(node):
            continue
        if node.op_type not in NORMALIZATION_AND_ELEMENTWISE:
            continue
        if node.op_type == BATCH_NORM:
            site = batch_norm_site(ctx, index, node)
            if isinstance(site, Refused):
                ctx.outcome(index, node, "left", None, site.reason)
                continue
        refusals = []
        for rule in RULES:
            if node.op_type not in rule.op_types:
                continue
            match = rule.condition(ctx, index, node)
            if isinstance(match, Refused):
                if match.reason and match.reason not in refusals:
                    refusals.append(match.reason)
                continue
            if rule.fallback and refusals:
                match.reason = "%s; it could not fold: %s" % (match.reason, "; ".join(refusals))
            rule.apply(ctx, index, node, match)
            break
        else:
            if node.op_type == BATCH_NORM:
                ctx.outcome(index, node, "left", None, "; ".join(refusals) or "no rule applies")
    for node in index.live_nodes():
        for label, subgraph in attribute_graphs(node):
            child = GraphIndex(subgraph, path="%s/%s.%s" % (index.path, index.label(node).lstrip("/"), label),
                               names=ctx.names, opset=ctx.opset, parent=index,
                               inputs_are_constant=True, constants_as_nodes=ctx.ir_version < 4)
            fold_graph(ctx, child)


def _holds_batch_norm(nodes):
    for node in nodes:
        if node.op_type == BATCH_NORM and is_default_domain(node):
            return True
        if any(_holds_batch_norm(graph.node) for _, graph in attribute_graphs(node)):
            return True
    return False


def _not_constant_reason(index, role, name):
    """Why a BN parameter is not a constant the pass may use, in words a user can act on."""
    if name in index.graph_inputs and name in index.initializers:
        return ("its %s %r is a graph input with a default value, which a caller may override at run time "
                "(re-export without keep_initializers_as_inputs to fold it)" % (role, name))
    if name in index.graph_inputs:
        return "its %s %r is a graph input, given only at run time" % (role, name)
    return "its %s %r is computed at run time, not a constant" % (role, name)


def inline_functions_holding_batch_norm(model):
    """Inline the model's local functions (torch's export_modules_as_functions writes them) when any of
    them holds a BatchNormalization: the pass folds graphs, where a function's weights are in reach.
    Returns the names of the functions inlined (none when no function holds one)."""
    if not any(_holds_batch_norm(function.node) for function in model.functions):
        return []
    names = sorted({function.name for function in model.functions})
    import onnx.inliner

    model.CopyFrom(onnx.inliner.inline_local_functions(model))
    return names


def fold_in_place(model, *, keep_bn=False):
    """Run the pass on `model` itself; returns the list of NodeOutcome."""
    opset = check_opset(model)
    if opset is None:
        return []
    ctx = FoldContext(model, opset, keep_bn)
    main = GraphIndex(model.graph, path="main", names=ctx.names, opset=opset,
                      inputs_are_constant=model.ir_version < 4, constants_as_nodes=model.ir_version < 4)
    fold_graph(ctx, main)
    remove_unused(ctx.indexes)
    for index in reversed(ctx.indexes):
        index.commit()
    return ctx.outcomes


def check_opset(model):
    """The model's ai.onnx opset; FoldError outside 7 .. the newest this onnx knows."""
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset < MIN_OPSET:
        raise FoldError("the model uses ai.onnx opset %d; foldnorm supports opsets %d to %d (convert it first, "
                        "e.g. with onnx.version_converter)" % (opset, MIN_OPSET, newest))
    if opset is not None and opset > newest:
        raise FoldError("the model uses ai.onnx opset %d, newer than the installed onnx knows (%d)" % (opset, newest))
    return opset


def _load(model_or_path):
    """(ModelProto, label, whether it was checked already)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "<in-memory model>", False
    if isinstance(model_or_path, (str, Path)):
        from .modelio import load_model

        return load_model(model_or_path), str(model_or_path), True
    raise TypeError("model_or_path must be an onnx.ModelProto or a path, got %s" % type(model_or_path).__name__)


def _check_model(model):
    check_opset(model)
    if model.ByteSize() > _PROTOBUF_LIMIT:
        return
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as error:
        message = str(error).strip().splitlines()
        raise FoldError("the model is not valid ONNX: %s" % (message[0] if message else type(error).__name__)) from None


def fold_model(model_or_path, *, keep_bn=False, verify=True, shapes=None, rtol=None, atol=None, seed=0):
    """Fold every foldable normalization of a model; returns (folded ModelProto, FoldReport).

    The caller's ModelProto is never modified. With verify=True the folded model is checked against the
    original in onnxruntime (foldnorm.verify) and VerificationError (carrying the report) is raised
    when an output diverges. FoldError for models the pass refuses (invalid, opset outside 7 .. newest).
    """
    original, label, checked = _load(model_or_path)
    if not checked:
        _check_model(original)
    else:
        check_opset(original)
    start = time.perf_counter()
    folded = onnx.ModelProto()
    folded.CopyFrom(original)
    inlined = inline_functions_holding_batch_norm(folded)
    outcomes = fold_in_place(folded, keep_bn=keep_bn)
    seconds = time.perf_counter() - start
    nodes_before, bytes_before = graph_statistics(original.graph)
    nodes_after, bytes_after = graph_statistics(folded.graph)
    report = FoldReport(label, outcomes, nodes_before, nodes_after, bytes_before, bytes_after, seconds)
    if inlined:
        report.notes.append("inlined the model's local functions %s, which hold BatchNormalization nodes, "
                            "to fold them" % ", ".join(inlined))
    if bytes_after > bytes_before:
        report.notes.append("the parameters grew: a folded weight is stored in full, also where the model "
                            "computed it from a smaller constant (ConstantOfShape, Expand, ...)")
    if verify:
        from .verification import verify as verify_models

        result = verify_models(original, folded, shapes=shapes, rtol=rtol, atol=atol, seed=seed)
        report.verification = result
        if not result.passed:
            diverged = ", ".join(repr(o.name) for o in result.outputs if not o.passed)
            raise VerificationError("the folded model's output %s differs from the original's beyond the "
                                    "tolerance; nothing was written" % diverged, report)
    return folded, report


def inspect_model(model_or_path):
    """What fold_model would do to each normalization node: the FoldReport, without verification."""
    _, report = fold_model(model_or_path, verify=False)
    return report
