"""Routes through layout ops: a per-channel map that reaches its layer through Transpose, Reshape, Flatten,
Squeeze, Unsqueeze or Identity.

A BatchNorm1d over tokens sits between two Transposes (MatMul -> Transpose -> BN -> Transpose), and a
classifier flattens a Conv's output before its Gemm (Conv -> BN -> Flatten -> Gemm). The map still folds
when its channels land on exactly one axis of the layer's tensor, the axis the layer's weight indexes.

Where the channels of a C-channel map lie in a tensor is a `Place`: along `axis`, index i belongs to
channel (i // inner) % C. The map's own input has Place(1, 1). A Transpose moves the axis; the ops that
keep the elements in order (Reshape, Flatten, Squeeze, Unsqueeze) keep each element's flat index, so the
channel of the element at flat index f is (f // S) % C, where S is the channel's stride; the channels land
on the axis whose stride divides S and whose size is a multiple of C * S / stride. When Flatten merges the
channels with the spatial axes after them, inner becomes H * W: on the layer's feature axis the map is the
per-channel value repeated over each channel's H * W features, which `feature_affine` writes out.
"""
from dataclasses import dataclass

import numpy as np

from .affine import ChannelAffine
from .context import CHANNEL_AXIS, Refused, describe, rank_of, shape_of
from ..io.proto import is_default_domain, node_attributes

LAYOUT_OPS = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class Place:
    """Where the channels of a C-channel map lie in a tensor: along `axis`, index i is channel
    (i // inner) % C."""

    axis: int
    inner: int = 1


SITE_PLACE = Place(CHANNEL_AXIS, 1)


@dataclass
class Route:
    """The layout ops between a map and its layer, nearest the map first, and the value at the layer's
    end: the layer's output (a route back) or the value the layer reads (a route forward)."""

    nodes: list
    value: str

    def describe(self, index):
        return ", ".join(describe(index, node) for node in self.nodes)


def is_layout(index, node):
    """Whether the node is a layout op whose data input is computed at run time."""
    return (node.op_type in LAYOUT_OPS and is_default_domain(node) and bool(node.input)
            and index.constant(node.input[0]) is None)


def route_back(index, value):
    """The layout ops that produce `value` from a value they alone read, followed back to the first
    node that is not one."""
    nodes = []
    while True:
        node = index.producer.get(value)
        if node is None or not is_layout(index, node) or index.only_value_reader(value) is None:
            return Route(nodes, value)
        nodes.append(node)
        value = node.input[0]


def route_forward(index, value):
    """The layout ops that are each the only reader of `value` and of each other's output."""
    nodes = []
    while True:
        node = index.only_reader(value)
        if node is None or not is_layout(index, node) or node.input[0] != value:
            return Route(nodes, value)
        nodes.append(node)
        value = node.output[0]


def _normalized(axes, rank):
    if rank is None:
        return None if any(a < 0 for a in axes) else sorted(axes)
    if any(not -rank <= a < rank for a in axes):
        return None
    return sorted(a % rank for a in axes)


def _axes(index, node):
    attributes = node_attributes(node)
    if "axes" in attributes:
        return [int(a) for a in attributes["axes"]]
    if len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        return None if value is None else [int(a) for a in value.array.reshape(-1)]
    return None


def _inserted(place, axes):
    """Place after inserting size-1 axes at the (output) positions `axes`."""
    kept = [i for i in range(place.axis + len(axes) + 1) if i not in axes]
    return Place(kept[place.axis], place.inner)


def _removed(place, axes):
    """Place after removing the size-1 axes `axes`; None when the channels lie on one of them."""
    if place.axis in axes:
        return None
    return Place(place.axis - sum(1 for a in axes if a < place.axis), place.inner)


def _through_flat(source, place, channels, target):
    """Place in `target` of channels at `place` in `source`, two shapes of the same elements in the same
    order; None when the channels do not land on one axis, or a dim that matters is unknown."""
    tail = source[place.axis + 1:]
    if any(d is None for d in tail):
        return None
    stride_of_channel = place.inner * int(np.prod(tail, dtype=np.int64))
    stride = 1
    for axis in reversed(range(len(target))):
        size = target[axis]
        if size is None:
            return None
        if size == 1:
            continue
        if stride_of_channel % stride:
            return None
        if stride * size > stride_of_channel:
            inner = stride_of_channel // stride
            return Place(axis, inner) if size % (inner * channels) == 0 else None
        stride *= size
    return None


def _through(ctx, index, node, place, channels, forward):
    """Place of the channels on the other side of one layout op, or None when they do not land on one
    axis there."""
    op = node.op_type
    source, target = (node.input[0], node.output[0]) if forward else (node.output[0], node.input[0])
    if op == "Identity":
        return place
    if op == "Transpose":
        perm = node_attributes(node).get("perm")
        if perm is None:
            rank = rank_of(ctx, index, source)
            if rank is None:
                return None
            perm = list(reversed(range(rank)))
        perm = [int(p) for p in perm]
        return Place(perm.index(place.axis) if forward else perm[place.axis], place.inner)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(index, node)
        if axes is not None:
            rank = rank_of(ctx, index, node.output[0] if op == "Unsqueeze" else node.input[0])
            axes = _normalized(axes, rank)
            if axes is not None:
                inserting = (op == "Unsqueeze") == forward
                return _inserted(place, axes) if inserting else _removed(place, axes)
    source_shape, target_shape = shape_of(ctx, index, source), shape_of(ctx, index, target)
    if source_shape is None or target_shape is None:
        return None
    return _through_flat(source_shape, place, channels, target_shape)


def place_at_layer(ctx, index, route, channels, *, forward):
    """Where the channels of a map on its own input (back) or output (forward) lie on the layer's
    tensor at the far end of `route`: a Place, or Refused naming the op they do not pass."""
    place = SITE_PLACE
    for node in route.nodes:
        place = _through(ctx, index, node, place, channels, forward)
        if place is None:
            return Refused("its %d channels do not land on a single axis after %s (or its shapes are "
                           "unknown)" % (channels, describe(index, node)))
    return place


def feature_affine(affine, place, features):
    """The map as one value per feature of an axis of `features` features on which its channels lie at
    `place`: channel (i // inner) % C's value at feature i. None when the sizes do not fit."""
    block = affine.channels * place.inner
    if features % block:
        return None
    if place.inner == 1 and block == features:
        return affine
    repeats = features // block

    def spread(values):
        return np.tile(np.repeat(values, place.inner), repeats)

    return ChannelAffine(spread(affine.scale), spread(affine.shift))
