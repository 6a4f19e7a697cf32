"""What one run of the fold pass shares, and the questions every rule asks of the graph.

`FoldContext` holds the options, the value types shape inference found, the model's fresh names and the
outcomes recorded so far. `Refused` is how a condition says no, with the reason a user reads.
"""
from dataclasses import dataclass

import onnx

from ..io.external_data import without_data
from ..io.proto import FLOAT_TYPES, attribute_graphs
from .graph_index import NameScope
from ..report import Cause, NodeOutcome

CHANNEL_AXIS = 1


@dataclass(frozen=True)
class Refused:
    """Why a reading or a rule does not go through. reason None: it does not apply here at all (nothing to
    report); cause: the kind of reason, for a normalization that must stay as it is (report.Cause)."""

    reason: str | None
    cause: Cause | None = None


class FoldContext:
    """What one run of the pass shares across graphs: options, value types, names, outcomes."""

    def __init__(self, model, opset, *, rewrite_bn=False, fold_through_qdq=False, held=None):
        self.opset = opset
        self.rewrite_bn = rewrite_bn  # a BN no rule folds becomes Mul/Add even when nothing merges into them
        self.held = held
        self.fold_through_qdq = fold_through_qdq  # fold across a QuantizeLinear -> DequantizeLinear pair
        self.types = value_types(model)
        self.names = NameScope(model)
        self.ir_version = model.ir_version
        self.outcomes = []
        self.indexes = []
        self.sites = {}

    def outcome(self, index, node, *, action, reason, into=None, direction=None, quantized=None, cause=None):
        self.outcomes.append(NodeOutcome(node=index.label(node), op_type=node.op_type, graph=index.path,
                                         action=action, into=into, direction=direction, reason=reason,
                                         quantized=quantized, cause=cause))


def describe(index, node):
    """A node as a user names it: its op type and name."""
    return "%s %r" % (node.op_type, index.label(node))


def shape_of(ctx, index, name):
    """The value's shape as far as it is known (None dims where unknown), or None when even its rank is."""
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


def rank_of(ctx, index, name):
    shape = shape_of(ctx, index, name)
    return None if shape is None else len(shape)


def elem_type_of(ctx, name):
    known = ctx.types.get(name)
    return known[0] if known is not None and known[0] else None


def float_constant(index, name):
    """The value's Constant when it is a float constant, else None."""
    value = index.constant(name)
    if value is None or value.elem_type not in FLOAT_TYPES:
        return None
    return value


def value_types(model):
    """{value name: (elem_type, shape)} for every value onnx shape inference can type, subgraphs too.

    shape is a tuple (None for an unknown dim) or None when even the rank is unknown. Inference runs on
    a copy and is best effort: a model it cannot handle (too large, unknown ops) keeps only the types it
    declares itself.
    """
    try:  # on the structure: inference reads dims and types, not the tensors' data
        typed = onnx.shape_inference.infer_shapes(without_data(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is an optional help; the declared types remain
        typed = model
    types = {}

    def visit(graph):
        for tensor in graph.initializer:
            types[tensor.name] = (tensor.data_type, tuple(tensor.dims))
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            if not value.type.HasField("tensor_type"):
                continue
            tensor_type = value.type.tensor_type
            shape = None
            if tensor_type.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
            types.setdefault(value.name, (tensor_type.elem_type, shape))
        for node in graph.node:
            for _, subgraph in attribute_graphs(node):
                visit(subgraph)

    visit(typed.graph)
    return types
