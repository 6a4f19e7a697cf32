"""The fold rules: each way of moving a per-channel map into a layer, as a condition and an apply.

A rule's `condition(ctx, index, node)` returns a `Match` when the rule may fire on the node, or a
`Refused` with the reason it may not; its `apply(ctx, index, node, match)` rewrites the graph. The rules
are listed in one table, RULES, and tried in that order by foldnorm.fold.driver. A fallback rule fires
only when the folds before it refused; its outcome lists their reasons.
"""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import absorb
from .affine import ChannelAffine
from .context import CHANNEL_AXIS, Refused, describe, elem_type_of, rank_of, shape_of
from .layers import Absorption, is_layer, absorb_into, forward_refusal, producing_layer, read_layer, write_absorption
from .proto import is_default_domain, node_attributes, numpy_dtype
from .quantized import quantized_apply, quantized_condition
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
    what absorbed the map (the layer, or the joint).
    """

    site: Site
    reason: str
    absorptions: list[Absorption] = field(default_factory=list)
    into: str | None = None
    direction: str | None = None
    joint: object = None
    rewrite: MulAdd | None = None


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
                       % (site.affine.channels, describe(index, layer.node), layer.out_channels))
    absorption = absorb_into(layer, site.affine, forward=False)
    if isinstance(absorption, Refused):
        return absorption
    return Match(site, "folded into the weights of %s, its producer" % describe(index, layer.node),
                 absorptions=[absorption], into=layer.op_type, direction="backward")


def backward_apply(ctx, index, node, match):
    remove_site(index, match.site)
    writer = write_absorption(ctx, index, match.absorptions[0])
    index.set_output(writer, 0, match.site.output)
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


def _keeps_input_shape(ctx, index, node, layer):
    """Whether a Mul/Add/Sub/Div before `layer` writes a value of its input's shape, so that the layer may
    read the input instead: its constant is a single value, or the input is known to have the layer's
    rank and input channels."""
    x, constant, _ = elementwise_operands(index, node)
    if constant.array.size == 1 and constant.array.ndim <= layer.rank:
        return True
    shape = shape_of(ctx, index, x)
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
    if not is_layer(reader) or reader.input[0] != site.output:
        return Refused("its output goes to %s, which cannot absorb a per-channel map on its input"
                       % describe(index, reader))
    layer = read_layer(ctx, index, reader)
    if isinstance(layer, Refused):
        return layer
    refusal = forward_refusal(index, layer)
    if refusal:
        return Refused(refusal)
    if site.affine is None:
        site = elementwise_site(ctx, index, node, layer.rank, layer.in_channels)
        if isinstance(site, Refused):
            return site
        if not _keeps_input_shape(ctx, index, node, layer):
            return Refused("its input %r may have fewer channels than %s reads (the constant would broadcast "
                           "it)" % (site.input, describe(index, reader)))
    if site.affine.channels != layer.in_channels:
        return Refused("it has %d channels, %s reads %d" % (site.affine.channels, describe(index, reader),
                                                           layer.in_channels))
    absorption = absorb_into(layer, site.affine, forward=True)
    if isinstance(absorption, Refused):
        return absorption
    return Match(site, "folded forward into the weights of %s, its only reader" % describe(index, reader),
                 absorptions=[absorption], into=layer.op_type, direction="forward")


def forward_apply(ctx, index, node, match):
    site = match.site
    layer = match.absorptions[0].layer
    index.set_input(layer.node, 0, site.input)
    remove_site(index, site)
    write_absorption(ctx, index, match.absorptions[0])
    record(ctx, index, match, "folded")


# ---------------------------------------------------------------------- the fallback: Mul and Add


def rewrite_condition(ctx, index, node):
    """What no rule folded becomes Mul + Add with constants shaped (C, 1, ..., 1), unless keep_bn."""
    if ctx.keep_bn:
        return Refused("kept as BatchNormalization (keep_bn)")
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
    try:
        mul, add = absorb.affine_as_mul_add(site.affine, rank, CHANNEL_AXIS, numpy_dtype(elem_type))
    except ValueError as error:
        return Refused("its map does not fit in the input's type: %s" % error)
    return Match(site, "rewritten as Mul and Add", rewrite=MulAdd(mul, add, elem_type))


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
