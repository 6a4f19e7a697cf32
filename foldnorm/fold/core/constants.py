"""Constant evaluation for the fold pass: the value of a node whose inputs are all constant.

Exporters build weights with small constant sub-graphs: torch's dynamo exporter writes a Conv's bias as
Expand / Cast / ConstantOfShape of constants, quantizers store weights as DequantizeLinear of integers,
and Identity chains, Where, Slice, Gather, Concat, Unsqueeze ... of constants are common. Shape and type
plumbing is evaluated by hand; arithmetic by onnx's reference evaluator.

Every evaluation first works out the size of its output from the shapes of its inputs (and, for
ConstantOfShape / Expand / Tile / Range, from their values) and raises ConstantTooLarge, without
allocating anything, when it would exceed MAX_CONSTANT_BYTES: a model may declare a constant of any size
it likes, and evaluating one must never cost gigabytes.
"""
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from ..io.proto import node_attributes, tensor_to_array

# The largest value the pass computes from constants. Real weights computed in the graph are far smaller;
# anything past this is refused with a reason instead of allocated.
MAX_CONSTANT_BYTES = 256 * 2**20

# Ops whose output is constant when their inputs are, evaluated by hand (shape/type plumbing) or by onnx's
# reference evaluator (arithmetic).
BY_HAND = ("Identity", "Cast", "ConstantOfShape", "Reshape", "Unsqueeze", "Squeeze", "Concat",
           "Transpose", "Flatten", "Shape", "Size", "DequantizeLinear", "CastLike")
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Min", "Max", "Sum", "Mean", "Where", "Equal", "Less",
               "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")
UNARY = ("Neg", "Sqrt", "Reciprocal", "Abs", "Exp", "Log", "Sign", "Floor", "Ceil", "Not", "Clip", "Relu")
BY_REFERENCE = ELEMENTWISE + UNARY + ("Expand", "Tile", "Slice", "Gather", "Split", "Range")


class ConstantTooLarge(ValueError):
    """A value computed from constants would be larger than MAX_CONSTANT_BYTES; nothing was allocated."""


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
    if op in ("Cast", "CastLike"):
        to = int(attributes["to"]) if op == "Cast" else inputs[1].elem_type
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
    if op == "Shape":
        dims = first.array.shape[int(attributes.get("start", 0)):attributes.get("end")]
        return Constant(np.array(dims, dtype=np.int64), TensorProto.INT64)
    if op == "Size":
        return Constant(np.array(first.array.size, dtype=np.int64), TensorProto.INT64)
    if op == "DequantizeLinear":
        return _dequantize(first, inputs[1], inputs[2] if len(inputs) > 2 else None, attributes)
    raise NotImplementedError(op)


def _dequantize(quantized, scale, zero_point, attributes):
    """(x - zero_point) * scale in the scale's type, as onnxruntime computes it, per tensor or per axis;
    blocked quantization is not evaluated."""
    if int(attributes.get("block_size", 0)):
        raise NotImplementedError("blocked DequantizeLinear")
    dtype = scale.array.dtype
    if quantized.array.dtype.kind not in "iu":
        raise NotImplementedError("DequantizeLinear of %s" % quantized.array.dtype)
    differences = quantized.array.astype(np.int64)
    scales = scale.array
    zeros = np.zeros((), np.int64) if zero_point is None else zero_point.array.astype(np.int64)
    if scales.size > 1 or zeros.size > 1:
        axis = int(attributes.get("axis", 1)) % differences.ndim
        shape = [1] * differences.ndim
        shape[axis] = -1
        scales = scales.reshape(shape) if scales.size > 1 else scales.reshape(())
        zeros = zeros.reshape(shape) if zeros.size > 1 else zeros.reshape(())
    else:
        scales, zeros = scales.reshape(()), zeros.reshape(())
    elem_type = int(attributes.get("output_dtype", 0)) or scale.elem_type
    values = (differences - zeros).astype(dtype) * scales
    return Constant(_round_to(values, elem_type), elem_type)


def _evaluate_by_reference(node, inputs, opset, output_position):
    from onnx.reference import ReferenceEvaluator

    if any(v is not None and v.elem_type == TensorProto.BFLOAT16 for v in inputs):
        return None
    feeds = {name: value.array for name, value in zip(node.input, inputs) if name}
    try:
        evaluator = ReferenceEvaluator(node, opsets={"": opset})
        outputs = evaluator.run(None, feeds)
    except RuntimeError as error:  # the reference evaluator has no implementation at this opset
        raise NotImplementedError(str(error)) from error
    return _constant_from_array(outputs[output_position])


def _size(shape):
    """Elements of a shape, as a Python int (no overflow)."""
    count = 1
    for dim in shape:
        count *= max(int(dim), 0)
    return count


def _int_values(value):
    return [int(v) for v in value.array.reshape(-1)]


def _broadcast_size(shapes):
    rank = max((len(shape) for shape in shapes), default=0)
    dims = [1] * rank
    for shape in shapes:
        for axis, dim in enumerate(shape, rank - len(shape)):
            dims[axis] = max(dims[axis], int(dim)) if dim != 0 and dims[axis] != 0 else 0
    return _size(dims)


def _range_size(inputs):
    start, limit, delta = (float(v.array.reshape(-1)[0]) for v in inputs[:3])
    if delta == 0 or not np.isfinite([start, limit, delta]).all():
        raise ValueError("Range with delta 0 or a non-finite bound")
    return max(int(np.ceil((limit - start) / delta)), 0)


def output_elements(node, inputs):
    """How many elements the node's largest output would have, worked out without computing it."""
    op = node.op_type
    present = [v for v in inputs if v is not None]
    if op == "ConstantOfShape":
        return _size(_int_values(present[0]))
    if op == "Expand":
        return _broadcast_size([present[0].array.shape, _int_values(present[1])])
    if op == "Tile":
        repeats = _int_values(present[1])
        return _size(present[0].array.shape) * _size(repeats)
    if op == "Range":
        return _range_size(present)
    if op in ELEMENTWISE:
        return _broadcast_size([v.array.shape for v in present])
    if op == "Concat":
        return sum(v.array.size for v in present)
    if op == "Gather":
        data, indices = present[0].array, present[1].array
        return data.size // max(data.shape[int(node_attributes(node).get("axis", 0))], 1) * indices.size
    return max((v.array.size for v in present), default=1)


def _itemsize(node, inputs):
    attributes = node_attributes(node)
    if node.op_type == "Cast":
        return helper.tensor_dtype_to_np_dtype(int(attributes["to"])).itemsize
    if node.op_type == "CastLike" and inputs[1] is not None:
        return inputs[1].array.itemsize
    if node.op_type == "ConstantOfShape":
        fill = attributes.get("value")
        return 4 if fill is None else helper.tensor_dtype_to_np_dtype(fill.data_type).itemsize
    return max([v.array.itemsize for v in inputs if v is not None] + [4])


def check_output_size(node, inputs, limit=MAX_CONSTANT_BYTES):
    """Raise ConstantTooLarge when the node's output would be larger than `limit` bytes."""
    size = output_elements(node, inputs) * _itemsize(node, inputs)
    if size > limit:
        raise ConstantTooLarge("is computed from constants by %s, but would be %s bytes, larger than the %d MiB "
                               "the pass evaluates" % (node.op_type, format(size, ","), limit // 2**20))


def evaluate_node(node, inputs, opset, output_position):
    """The Constant at output `output_position` of `node`, whose inputs are the Constants `inputs`
    (None for an omitted optional input); None when the op is not one that is evaluated.

    Raises ConstantTooLarge, before allocating anything, when the output would exceed MAX_CONSTANT_BYTES.
    """
    if node.op_type == "Constant":
        return constant_node_value(node)
    if node.op_type in BY_HAND or node.op_type in BY_REFERENCE:
        check_output_size(node, inputs)
    if node.op_type in BY_HAND:
        return _evaluate_by_hand(node, inputs, opset)
    if node.op_type in BY_REFERENCE:
        return _evaluate_by_reference(node, inputs, opset, output_position)
    return None
