"""ONNX protobuf helpers of the fold pass: tensors to arrays and back, attributes, subgraphs, opsets, types.

bfloat16 tensors are handed out as float32 arrays (exact) and written back rounded to bfloat16, so the
numeric code never sees an ml_dtypes array.
"""
import math

import numpy as np
from onnx import AttributeProto, TensorProto, helper, numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE)


def is_default_domain(node):
    return node.domain in DEFAULT_DOMAINS


def attribute_graphs(node):
    """[(label, GraphProto)] for the subgraphs held by a node's attributes (If, Loop, Scan, ...)."""
    graphs = []
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            graphs.append((attribute.name, attribute.g))
        elif attribute.type == AttributeProto.GRAPHS:
            graphs.extend(("%s[%d]" % (attribute.name, i), g) for i, g in enumerate(attribute.graphs))
    return graphs


def node_attributes(node):
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def set_float_attribute(node, name, value):
    """Set (or add) a float attribute of a node in place."""
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.f = float(value)
            return
    node.attribute.append(helper.make_attribute(name, float(value)))


def tensor_to_array(tensor):
    """A tensor's data as a NumPy array: float32 for bfloat16 (exact), the natural dtype otherwise."""
    array = numpy_helper.to_array(tensor)
    if tensor.data_type == TensorProto.BFLOAT16:
        array = array.astype(np.float32)
    return array


def array_to_tensor(array, name, elem_type, into=None, held=None):
    """A TensorProto of element type `elem_type` holding `array` (rounded to bfloat16 when asked),
    written into the TensorProto `into` when given (a new initializer: for a plain numeric array, one
    copy of the data fewer than building the tensor apart and copying it in; from HELD_ARRAY_BYTES on and
    given `held`, a foldnorm.fold.io.external_data.HeldArrays, no copy at all until it is saved or handed
    out; a large deferred array (is_deferred) of the element type's dtype is held as it is, and computed
    only then)."""
    holds = held is not None and into is not None and elem_type in _PLAIN_RAW_TYPES
    if (holds and is_deferred(array) and array.nbytes >= HELD_ARRAY_BYTES
            and array.dtype == helper.tensor_dtype_to_np_dtype(elem_type)):
        return held.hold(into, name, array, elem_type)  # computed when it is written, never held whole
    if elem_type == TensorProto.BFLOAT16:
        import ml_dtypes

        array = np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16)
    else:
        array = np.asarray(array, dtype=helper.tensor_dtype_to_np_dtype(elem_type))
    if into is None:
        return numpy_helper.from_array(array, name)
    if holds and array.nbytes >= HELD_ARRAY_BYTES:
        return held.hold(into, name, array, elem_type)  # a large weight: held as the array, not copied in
    if elem_type not in _PLAIN_RAW_TYPES:
        into.CopyFrom(numpy_helper.from_array(array, name))
        return into
    into.name = name
    into.data_type = elem_type
    into.dims.extend(array.shape)
    into.raw_data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return into


# From this size on, a new initializer's data stays a NumPy array until the model is saved or handed out.
HELD_ARRAY_BYTES = 2**20
# Element types whose raw data is the little-endian bytes of the NumPy array.
_PLAIN_RAW_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8,
                    TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
                    TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL)


def is_deferred(array):
    """Whether `array` is an array-like computed when read (core.absorb.ScaledRows): np.asarray computes
    it whole, its blocks() method yields it in C order a block of whole rows at a time."""
    return not isinstance(array, np.ndarray) and callable(getattr(array, "blocks", None))


def numpy_dtype(elem_type):
    """The NumPy dtype the fold arithmetic hands back for `elem_type` (float32 stands in for bfloat16)."""
    if elem_type == TensorProto.BFLOAT16:
        return np.dtype(np.float32)
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def tensor_nbytes(tensor):
    """Bytes of a tensor's data, from its dims and type (no decoding, external data included)."""
    count = math.prod(tensor.dims)
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * _itemsize(tensor.data_type)


def _known_itemsize(elem_type):
    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 1


_ITEMSIZES = {elem_type: _known_itemsize(elem_type) for elem_type in TensorProto.DataType.values()}


def _itemsize(elem_type):
    return _ITEMSIZES.get(elem_type, 1)


def graph_statistics(graph):
    """(nodes, parameter bytes) of a graph and all its subgraphs; parameters are initializers and the
    tensors of Constant nodes."""
    nodes = len(graph.node)
    size = sum(tensor_nbytes(t) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            size += sum(_constant_attribute_nbytes(attribute) for attribute in node.attribute)
        for _, subgraph in attribute_graphs(node):
            sub_nodes, sub_size = graph_statistics(subgraph)
            nodes += sub_nodes
            size += sub_size
    return nodes, size


def _constant_attribute_nbytes(attribute):
    if attribute.type == AttributeProto.TENSOR:
        return tensor_nbytes(attribute.t)
    if attribute.type == AttributeProto.FLOATS:
        return 4 * len(attribute.floats)
    if attribute.type == AttributeProto.INTS:
        return 8 * len(attribute.ints)
    return {AttributeProto.FLOAT: 4, AttributeProto.INT: 8}.get(attribute.type, 0)


def default_opset(model):
    """The ai.onnx opset version a model imports, or None when it imports none."""
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS:
            return opset.version
    return None
