"""Constant evaluation for the fold pass: the value of a node whose inputs are all constant.

Exporters build weights with small constant sub-graphs (ConstantOfShape, Cast, Reshape, Expand, ... of
constants). Shape and type plumbing is evaluated by hand; small arithmetic by onnx's reference evaluator.
"""
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from .proto import node_attributes, tensor_to_array

# Ops whose output is constant when their inputs are, evaluated by hand (shape/type plumbing) or by onnx's
# reference evaluator (small arithmetic).
BY_HAND = ("Identity", "Cast", "ConstantOfShape", "Reshape", "Unsqueeze", "Squeeze", "Concat",
           "Transpose", "Flatten")
BY_REFERENCE = ("Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Expand", "Tile", "Slice",
                "Gather", "Split", "Range", "DequantizeLinear")


@dataclass(frozen=True)
class Constant:
    """A constant value: `array` (float32 for bfloat16 data) and its ONNX element type."""

    array: np.ndarray
    elem_type: int


def constant_node_value(node):
    attributes = {a.name: a for a in node.attribute}
    if "value" in attributes:
        tensor = attributes["value"].t
        if tensor.data_location == TensorProto.EXTERNAL:
            return None
        return Constant(tensor_to_array(tensor), tensor.data_type)
    if "value_float" in attributes:
        return Constant(np.array(attributes["value_float"].f, dtype=np.float32), TensorProto.FLOAT)
    if "value_floats" in attributes:
        return Constant(np.array(list(attributes["value_floats"].floats), dtype=np.float32), TensorProto.FLOAT)
    if "value_int" in attributes:
        return Constant(np.array(attributes["value_int"].i, dtype=np.int64), TensorProto.INT64)
    if "value_ints" in attributes:
        return Constant(np.array(list(attributes["value_ints"].ints), dtype=np.int64), TensorProto.INT64)
    if "sparse_value" in attributes:
        from onnx.reference import ReferenceEvaluator

        (array,) = ReferenceEvaluator(node).run(None, {})
        return _constant_from_array(array)
    return None


def _constant_from_array(array):
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return Constant(array.astype(np.float32), TensorProto.BFLOAT16)
    return Constant(array, helper.np_dtype_to_tensor_dtype(array.dtype))


def _round_to(array, elem_type):
    if elem_type == TensorProto.BFLOAT16:
        import ml_dtypes

        return np.asarray(array).astype(ml_dtypes.bfloat16).astype(np.float32)
    return np.asarray(array).astype(helper.tensor_dtype_to_np_dtype(elem_type))


def _axes(node, inputs, opset, position=1):
    """Axes given as an attribute (older opsets) or as input `position` (newer)."""
    attributes = node_attributes(node)
    if "axes" in attributes:
        return [int(a) for a in attributes["axes"]]
    if len(inputs) > position and inputs[position] is not None:
        return [int(a) for a in inputs[position].array.reshape(-1)]
    return None


def _evaluate_by_hand(node, inputs, opset):
    op = node.op_type
    attributes = node_attributes(node)
    first = inputs[0] if inputs else None
    if op == "Identity":
        return first
    if op == "Cast":
        to = int(attributes["to"])
        return Constant(_round_to(first.array, to), to)
    if op == "ConstantOfShape":
        shape = [int(d) for d in first.array.reshape(-1)]
        fill = attributes.get("value")
        if fill is None:
            return Constant(np.zeros(shape, dtype=np.float32), TensorProto.FLOAT)
        value = tensor_to_array(fill).reshape(-1)[0]
        return Constant(np.full(shape, value, dtype=value.dtype), fill.data_type)
    if op == "Reshape":
        if "shape" in attributes:
            target = [int(d) for d in attributes["shape"]]
        else:
            target = [int(d) for d in inputs[1].array.reshape(-1)]
        if not attributes.get("allowzero", 0):
            target = [first.array.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return Constant(first.array.reshape(target), first.elem_type)
    if op == "Unsqueeze":
        axes = _axes(node, inputs, opset)
        rank = first.array.ndim + len(axes)
        array = first.array
        for axis in sorted(a % rank for a in axes):
            array = np.expand_dims(array, axis)
        return Constant(array, first.elem_type)
    if op == "Squeeze":
        axes = _axes(node, inputs, opset)
        if axes is None:
            return Constant(np.squeeze(first.array), first.elem_type)
        return Constant(np.squeeze(first.array, axis=tuple(a % first.array.ndim for a in axes)), first.elem_type)
    if op == "Concat":
        return Constant(np.concatenate([v.array for v in inputs if v is not None], axis=int(attributes["axis"])),
                        first.elem_type)
    if op == "Transpose":
        return Constant(np.transpose(first.array, attributes.get("perm")), first.elem_type)
    if op == "Flatten":
        axis = int(attributes.get("axis", 1)) % max(first.array.ndim, 1)
        outer = int(np.prod(first.array.shape[:axis], dtype=np.int64))
        return Constant(first.array.reshape(outer, -1), first.elem_type)
    raise NotImplementedError(op)


def _evaluate_by_reference(node, inputs, opset, output_position):
    from onnx.reference import ReferenceEvaluator

    if any(v is not None and v.elem_type == TensorProto.BFLOAT16 for v in inputs):
        return None
    feeds = {name: value.array for name, value in zip(node.input, inputs) if name}
    evaluator = ReferenceEvaluator(node, opsets={"": opset})
    outputs = evaluator.run(None, feeds)
    return _constant_from_array(outputs[output_position])


def evaluate_node(node, inputs, opset, output_position):
    """The Constant at output `output_position` of `node`, whose inputs are the Constants `inputs`
    (None for an omitted optional input); None when the op is not one that is evaluated."""
    if node.op_type == "Constant":
        return constant_node_value(node)
    if node.op_type in BY_HAND:
        return _evaluate_by_hand(node, inputs, opset)
    if node.op_type in BY_REFERENCE:
        return _evaluate_by_reference(node, inputs, opset, output_position)
    return None
