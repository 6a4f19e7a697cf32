"""The fold rules: each way of moving a per-channel map into a layer, as a condition and an apply.

A rule's `condition(ctx, index, node)` returns a `Match` when the rule may fire on the node, or a
`Refused` with the reason it may not; its `apply(ctx, index, node, match)` rewrites the graph. The rules
are listed in one table, RULES, and tried in that order by foldnorm.fold.core.driver. A fallback rule fires
only when the folds before it refused; its outcome lists their reasons.
"""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import absorb
from .affine import ChannelAffine
from .context import CHANNEL_AXIS, Refused, describe, elem_type_of, rank_of, shape_of
from .layers import (Absorption, absorb_into, axis_refusal, forward_refusal, is_layer, producing_layer, read_layer,
                     write_absorption)
from .layout import Route, feature_affine, place_at_layer, route_back, route_forward
from ..io.proto import is_default_domain, node_attributes, numpy_dtype
from ..quantized.rules import quantized_apply, quantized_condition
from .sites import (BATCH_NORM, SITE_OPS, Site, batch_norm_site, elementwise_operands, elementwise_site,
                    extend_chain, site_input, site_of)


@dataclass
class MulAdd:
    """The constants of the Mul and the Add that replace a BatchNormalization no rule folds."""

    mul: np.ndarray
    add: np.ndarray
    elem_type: int


@dataclass
class Match:
    """What a rule found: the site, the layers' new parameters, and how the report describes the fold.

    direction: "backward" (into the producer), "forward" (into the only reader), "across" (into the
    producers of each branch of `joint`, an Add/Sum/Concat) or None for a rewrite; into: the op type of
    what absorbed the map (the layer, or the joint); route: the layout ops between the map and its layer.
    """

    site: Site
    reason: str
    absorptions: list[Absorption] = field(default_factory=list)
    into: str | None = None
    direction: str | None = None
    joint: object = None
    rewrite: MulAdd | None = None
    route: Route | None = None


@dataclass(frozen=True)
class Rule:
    """One way of folding: condition(ctx, index, node) -> Match | Refused, apply(ctx, index, node, match)."""

    name: str
    op_types: tuple
    condition: Callable
    apply: Callable
    fallback: bool = False


def remove_site(index, site):
    for node in site.nodes:
        index.remove(node)


def record(ctx, index, match, action):
    """One outcome for the site's first node, and one for each node merged into its map."""
    first, *merged = match.site.nodes
    if action == "folded":
        ctx.outcome(index, first, action=action, into=match.into, direction=match.direction, reason=match.reason)
    else:
        ctx.outcome(index, first, action=action, reason=match.reason)
    for node in merged:
        into, direction = (match.into, match.direction) if action == "folded" else ("Mul/Add", "merged")
        ctx.outcome(index, node, action="folded", into=into, direction=direction,
                    reason="merged with %s, which it follows" % describe(index, first))


# ---------------------------------------------------------------------- backward, into the producer


def _site_shape(ctx, index, route, value, layer, channels_of_layer):
    """(rank, channels) of the tensor a map acts on: the layer's own when no layout op is between them."""
    if not route.nodes:
        return layer.rank, channels_of_layer
    shape = shape_of(ctx, index, value)
    if shape is None or len(shape) < 2:
        return None, None
    return len(shape), shape[CHANNEL_AXIS]


def _through(route, index):
    return " through %s" % route.describe(index) if route.nodes else ""


def _reached(route, index):
    return " (reached through %s)" % route.describe(index) if route.nodes else ""


def _layer_affine(ctx, index, site, route, layer, *, forward):
    """The site's map as one value per feature of the layer's weight, or Refused."""
    place = place_at_layer(ctx, index, route, site.affine.channels, forward=forward)
    if isinstance(place, Refused):
        return place
    refusal = axis_refusal(index, layer, place.axis, forward=forward)
    if refusal:
        return Refused(refusal + _reached(route, index))
    features = layer.in_channels if forward else layer.out_channels
    affine = feature_affine(site.affine, place, features)
    if affine is None or (not route.nodes and site.affine.channels != features):
        return Refused("it has %d channels, %s %s %d%s" % (
            site.affine.channels, describe(index, layer.node), "reads" if forward else "outputs", features,
            _reached(route, index)))
    return affine


def backward_condition(ctx, index, node):
    """Fold the map into the layer that produces its input (that layer feeds nothing else), directly or
    through layout ops that feed nothing else."""
    x = site_input(index, node)
    if x is None:
        return Refused(None)
    route = route_back(index, x)
    layer = producing_layer(ctx, index, route.value)
    if isinstance(layer, Refused):
        return layer
    if layer.bias_add is node or (node.op_type == "Add" and layer.op_type == "MatMul" and layer.bias_add is None):
        return Refused(None)  # it is the MatMul's own bias
    rank, channels = _site_shape(ctx, index, route, x, layer, layer.out_channels)
    if node.op_type != BATCH_NORM and (rank is None or channels is None):
        return Refused("the shape of its input %r is unknown" % x)
    site = site_of(ctx, index, node, rank, channels)
    if isinstance(site, Refused):
        return site
    affine = _layer_affine(ctx, index, site, route, layer, forward=False)
    if isinstance(affine, Refused):
        return affine
    absorption = absorb_into(layer, affine, forward=False)
    if isinstance(absorption, Refused):
        return absorption
    return Match(site, "folded into the weights of %s, its producer%s" % (describe(index, layer.node),
                                                                         _through(route, index)),
                 absorptions=[absorption], into=layer.op_type, direction="backward", route=route)


def backward_apply(ctx, index, node, match):
    remove_site(index, match.site)
    writer = write_absorption(ctx, index, match.absorptions[0])
    if match.route is not None and match.route.nodes:
        writer = match.route.nodes[0]  # the layout op nearest the map now writes its output
    replaced = writer.output[0]
    shape_readers = index.shape_readers(replaced)
    index.set_output(writer, 0, match.site.output)
    for reader in shape_readers:  # the map keeps the shape: they read the same shape under its new name
        index.set_input(reader, 0, match.site.output)
    record(ctx, index, match, "folded")


# ---------------------------------------------------------------------- across a join of branches


def _branch_layers(ctx, index, joint):
    layers = []
    for name in joint.input:
        if not name or list(joint.input).count(name) > 1:
            return Refused("%s reads %r more than once" % (describe(index, joint), name))
        layer = producing_layer(ctx, index, name)
        if isinstance(layer, Refused):
            return Refused("%s's branch: %s" % (describe(index, joint), layer.reason))
        refusal = axis_refusal(index, layer, CHANNEL_AXIS, forward=False)
        if refusal:
            return Refused("%s's branch: %s" % (describe(index, joint), refusal))
        layers.append(layer)
    if len({layer.rank for layer in layers}) != 1:
        return Refused("the branches of %s have different ranks" % describe(index, joint))
    return layers


def _joint(ctx, index, node, op_types):
    x = site_input(index, node)
    joint = index.producer.get(x) if x else None
    if joint is None or joint.op_type not in op_types or not is_default_domain(joint):
        return None, Refused(None)
    if index.only_reader(x) is None:
        return None, Refused("the output of %s has other readers" % describe(index, joint))
    return joint, None


def _across_match(index, site, joint, absorptions, reason):
    return Match(site, reason, absorptions=absorptions, into=joint.op_type, direction="across", joint=joint)


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
        return Refused("the branches of %s have different channel counts" % describe(index, joint))
    site = site_of(ctx, index, node, layers[0].rank, channels.pop())
    if isinstance(site, Refused):
        return site
    absorptions = []
    for i, layer in enumerate(layers):
        part = site.affine if i == 0 else ChannelAffine(site.affine.scale, np.zeros(site.affine.channels))
        if layer.out_channels != site.affine.channels:
            return Refused("%s outputs %d channels, the map has %d"
                           % (describe(index, layer.node), layer.out_channels, site.affine.channels))
        absorption = absorb_into(layer, part, forward=False)
        if isinstance(absorption, Refused):
            return absorption
        absorptions.append(absorption)
    return _across_match(index, site, joint, absorptions, "folded across %s into %s" % (
        describe(index, joint), ", ".join(describe(index, a.layer.node) for a in absorptions)))


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
        return Refused("%s joins along axis %d, not the channels" % (describe(index, joint), axis))
    total = sum(layer.out_channels for layer in layers)
    site = site_of(ctx, index, node, rank, total)
    if isinstance(site, Refused):
        return site
    if site.affine.channels != total:
        return Refused("%s has %d channels, the map %d" % (describe(index, joint), total, site.affine.channels))
    absorptions, start = [], 0
    for layer in layers:
        part = site.affine.slice(start, start + layer.out_channels)
        start += layer.out_channels
        absorption = absorb_into(layer, part, forward=False)
        if isinstance(absorption, Refused):
            return absorption
        absorptions.append(absorption)
    return _across_match(index, site, joint, absorptions, "folded across %s, each part into %s" % (
        describe(index, joint), ", ".join(describe(index, a.layer.node) for a in absorptions)))


def across_apply(ctx, index, node, match):
    remove_site(index, match.site)
    for absorption in match.absorptions:
        write_absorption(ctx, index, absorption)
    index.set_output(match.joint, 0, match.site.output)
    record(ctx, index, match, "folded")


# ---------------------------------------------------------------------- forward, into the only reader


def _keeps_input_shape(ctx, index, node, rank, channels):
    """Whether a Mul/Add/Sub/Div writes a value of its input's shape, so that what reads its output may
    read its input instead: its constant is a single value, or the input is known to have the output's
    rank and channels."""
    x, constant, _ = elementwise_operands(index, node)
    if constant.array.size == 1 and constant.array.ndim <= rank:
        return True
    shape = shape_of(ctx, index, x)
    return shape is not None and len(shape) == rank and shape[1] == channels


def forward_condition(ctx, index, node):
    """Fold the map into the layer that is the only reader of its output, directly or through layout
    ops that are each the only reader (Conv without padding, Gemm, MatMul)."""
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
    route = route_forward(index, site.output)
    reader = index.only_reader(route.value)
    if reader is None:
        count = len(index.readers(route.value))
        return Refused("its output %s%s" % ("is a graph output" if index.is_graph_output(route.value)
                                            else "has %d readers" % count, _through(route, index)))
    if not is_layer(reader) or reader.input[0] != route.value:
        return Refused("its output goes to %s, which cannot absorb a per-channel map on its input"
                       % describe(index, reader))
    layer = read_layer(ctx, index, reader)
    if isinstance(layer, Refused):
        return layer
    refusal = forward_refusal(index, layer)
    if refusal:
        return Refused(refusal)
    if site.affine is None:
        rank, channels = _site_shape(ctx, index, route, site.output, layer, layer.in_channels)
        if rank is None or channels is None:
            return Refused("the shape of its output %r is unknown" % site.output)
        site = elementwise_site(ctx, index, node, rank, channels)
        if isinstance(site, Refused):
            return site
        if not _keeps_input_shape(ctx, index, node, rank, channels):
            return Refused("its input %r may have fewer channels than %s reads (the constant would broadcast "
                           "it)" % (site.input, describe(index, reader)))
    affine = _layer_affine(ctx, index, site, route, layer, forward=True)
    if isinstance(affine, Refused):
        return affine
    absorption = absorb_into(layer, affine, forward=True)
    if isinstance(absorption, Refused):
        return absorption
    return Match(site, "folded forward into the weights of %s, its only reader%s" % (
        describe(index, reader), _through(route, index)),
        absorptions=[absorption], into=layer.op_type, direction="forward", route=route)


def forward_apply(ctx, index, node, match):
    site = match.site
    first_reader = match.route.nodes[0] if match.route.nodes else match.absorptions[0].layer.node
    index.set_input(first_reader, 0, site.input)
    remove_site(index, site)
    write_absorption(ctx, index, match.absorptions[0])
    record(ctx, index, match, "folded")


# ---------------------------------------------------------------------- the fallback: Mul and Add


def rewrite_condition(ctx, index, node):
    """What no rule folded becomes Mul + Add with constants shaped (C, 1, ..., 1) when the per-channel
    Mul/Add/Sub/Div that follow it merge into them (fewer nodes), or always with rewrite_bn; otherwise it
    stays a BatchNormalization, which onnxruntime runs in one pass where Mul and Add take two."""
    site = batch_norm_site(ctx, index, node)
    if isinstance(site, Refused):
        return site
    rank = rank_of(ctx, index, site.input)
    elem_type = elem_type_of(ctx, site.input)
    if elem_type is None and ctx.opset < 15:
        elem_type = index.constant(node.input[1]).elem_type  # X and scale share one type before opset 15
    if rank is None or rank < 2 or elem_type is None:
        return Refused("the rank or type of its input %r is unknown, so it cannot be rewritten as Mul/Add"
                       % site.input)
    site = extend_chain(ctx, index, site)
    merged = site.nodes[1:]
    if not merged and not ctx.rewrite_bn:
        return Refused("kept as BatchNormalization: nothing merges into a Mul/Add rewrite, which would run slower "
                       "(<<rewrite_bn>> rewrites it anyway)")
    try:
        mul, add = absorb.affine_as_mul_add(site.affine, rank, CHANNEL_AXIS, numpy_dtype(elem_type))
    except ValueError as error:
        return Refused("its map does not fit in the input's type: %s" % error)
    reason = "rewritten as Mul and Add"
    if merged:
        reason += ", with %s after it merged in" % ", ".join(describe(index, n) for n in merged)
    return Match(site, reason, rewrite=MulAdd(mul, add, elem_type))


def rewrite_apply(ctx, index, node, match):
    site = match.site
    rewrite = match.rewrite
    label = index.label(node)
    steps = []
    if not np.all(rewrite.mul == 1):
        steps.append(("Mul", rewrite.mul))
    if not np.all(rewrite.add == 0):
        steps.append(("Add", rewrite.add))
    remove_site(index, site)
    value = site.input
    if not steps:
        index.insert_after(node, index.new_node("Identity", [value], [site.output], label + "_identity"))
    for i, (op_type, constant) in enumerate(steps):
        name = index.add_constant(constant, rewrite.elem_type, "%s_%s" % (label, op_type.lower()))
        output = site.output if i == len(steps) - 1 else ctx.names.fresh("%s_scaled" % label)
        index.insert_after(node, index.new_node(op_type, [value, name], [output], "%s_%s" % (label, op_type.lower())))
        value = output
    record(ctx, index, match, "rewritten")


RULES = (
    Rule("fold into the producing layer", SITE_OPS, backward_condition, backward_apply),
    Rule("fold across Add/Sum", SITE_OPS, across_add_condition, across_apply),
    Rule("fold across Concat", SITE_OPS, across_concat_condition, across_apply),
    Rule("fold forward into the reading layer", SITE_OPS, forward_condition, forward_apply),
    Rule("fold into a quantized layer", (BATCH_NORM,), quantized_condition, quantized_apply),
    Rule("rewrite as Mul and Add", (BATCH_NORM,), rewrite_condition, rewrite_apply, fallback=True),
)
