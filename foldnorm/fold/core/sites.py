"""Sites: the per-channel affine maps in a graph that the fold pass may move into a layer.

A site is an inference-mode BatchNormalization, or a Mul/Add/Sub/Div by a constant that varies only along
the channel axis, read as one `ChannelAffine` (foldnorm.fold.core.affine), possibly followed by more
per-channel Mul/Add/Sub/Div merged into the same map.
"""
from dataclasses import dataclass

from .affine import ELEMENTWISE_OPS, ChannelAffine, affine_from_batch_norm, affine_from_elementwise
from ..report import Cause
from .context import CHANNEL_AXIS, Refused, float_constant, shape_of
from ..io.proto import is_default_domain, node_attributes

BATCH_NORM = "BatchNormalization"
SITE_OPS = (BATCH_NORM,) + ELEMENTWISE_OPS


@dataclass
class Site:
    """A per-channel affine map in the graph: its nodes (a BN or a Mul/Add/Sub/Div, possibly followed by
    per-channel Mul/Add/Sub/Div), the value it reads and the value it writes."""

    nodes: list
    affine: ChannelAffine | None
    input: str
    output: str


def batch_norm_site(ctx, index, node):
    """The Site of a BatchNormalization, or Refused saying why it must stay exactly as it is."""
    key = id(node)
    if key not in ctx.sites:
        ctx.sites[key] = _batch_norm_site(ctx, index, node)
    return ctx.sites[key]


def _batch_norm_site(ctx, index, node):
    attributes = node_attributes(node)
    if ctx.opset >= 14 and attributes.get("training_mode", 0):
        return Refused("training_mode=1: it normalizes with the batch's own statistics", Cause.TRAINING_MODE)
    extra = [name for name in node.output[1:] if name]
    if ctx.opset < 14 and extra:
        return Refused("it has running-statistics outputs, which before opset 14 means training mode",
                       Cause.TRAINING_MODE)
    used = [name for name in extra if index.is_read(name)]
    if used:
        return Refused("its running-statistics output %s is used" % ", ".join(repr(n) for n in used),
                       Cause.STATISTICS_READ)
    if len(node.input) < 5:
        return Refused("it has %d inputs instead of 5" % len(node.input), Cause.INVALID)
    params = {}
    for role, name in zip(("scale", "bias", "mean", "var"), node.input[1:5]):
        value = float_constant(index, name)
        if value is None:
            return Refused(*not_constant_reason(index, role, name))
        params[role] = value.array
    if ctx.opset < 9 and attributes.get("spatial", 1) == 0:
        shapes = {p.shape for p in params.values()}
        if any(len(shape) != 1 for shape in shapes):
            return Refused("spatial=0 with per-element parameters of shape %s: one value per position, not "
                           "per channel" % (sorted(shapes)[0],), Cause.INVALID)
    try:
        affine = affine_from_batch_norm(params["scale"], params["bias"], params["mean"], params["var"],
                                        attributes.get("epsilon", 1e-5))
    except ValueError as error:
        return Refused("its parameters do not form a finite per-channel map (%s)" % error, Cause.INVALID)
    channels = (shape_of(ctx, index, node.input[0]) or (None, None))[1:2]
    if channels and channels[0] is not None and channels[0] != affine.channels:
        return Refused("its input has %d channels but its parameters %d" % (channels[0], affine.channels),
                       Cause.INVALID)
    return Site([node], affine, node.input[0], node.output[0])


def not_constant_reason(index, role, name):
    """(why a BN parameter is not a constant the pass may use, in words a user can act on; its Cause)."""
    if name in index.graph_inputs and name in index.initializers:
        return ("its %s %r is a graph input with a default value, which a caller may override at run time "
                "(re-export without keep_initializers_as_inputs, or pass <<fold_input_initializers>>, to fold "
                "it)" % (role, name), Cause.PARAMETER_OVERRIDABLE)
    if name in index.graph_inputs:
        return "its %s %r is a graph input, given only at run time" % (role, name), Cause.PARAMETER_INPUT
    too_large = index.too_large(name)
    if too_large is not None:
        return "its %s is not evaluated: %s" % (role, too_large), Cause.PARAMETER_COMPUTED
    return "its %s %r is computed at run time, not a constant" % (role, name), Cause.PARAMETER_COMPUTED


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
    """The value a BN or a Mul/Add/Sub/Div by a constant reads, or None."""
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
    """The Site of a BN or a Mul/Add/Sub/Div on a tensor of this rank and channel count, or Refused."""
    if node.op_type == BATCH_NORM:
        return batch_norm_site(ctx, index, node)
    return elementwise_site(ctx, index, node, rank, channels)


def extend_chain(ctx, index, site):
    """The site followed by the per-channel Mul/Add/Sub/Div that are each the only reader of the last."""
    shape = shape_of(ctx, index, site.input)
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
