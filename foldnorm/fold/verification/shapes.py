"""The input shapes verification runs at: the model's fixed dims, the caller's shapes, and sizes it chooses.

A declared dim is fixed (dim_value > 0), dynamic (a dim_param, neither field set, or dim_value 0 or -1:
-1 is how some exporters, Paddle's among them, write a dynamic dim) or invalid (any other negative value).

Every dynamic dim is a `Symbol`: a named dim (dim_param) is one symbol wherever it appears, so it gets one
size everywhere; unnamed dims share one symbol per role. The role is "batch" for a dim at axis 0 (of any
input, for a named dim) and "size" otherwise (spatial sizes, sequence lengths, feature counts).

Without the caller's shapes, verification tries candidate sizes until onnxruntime runs the original:
batch sizes BATCH_SIZES, the other sizes SIZE_LADDER (224 first, then multiples of 32, which strided
models need, then small sizes), each followed by the small dims of the model's own initializers (a
Reshape or a weight may fix a size), at most FIRST_SHAPE_ATTEMPTS candidates and LADDER_SECONDS. It then looks for a second shape whose batch and sizes both differ from the
first, so that a fold which is only right at one shape fails.

Sizes are bounded in bytes: a shape the caller gives or the model fixes may take up to INPUT_BYTES_LIMIT
for all inputs together (beyond it verification is refused, never a MemoryError); a chosen candidate
whose inputs would take more than CHOSEN_BYTES_LIMIT is skipped.
"""
import math
from collections import Counter
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

from ..errors import FoldError

BATCH_SIZES = (1, 2)
SIZE_LADDER = (224, 64, 32, 256, 320, 128, 96, 16, 8, 3, 1)
MODEL_SIZES = 6  # how many sizes read off the model's initializers extend the ladder
FIRST_SHAPE_ATTEMPTS = 32
SECOND_SHAPE_ATTEMPTS = 8
LADDER_SECONDS = 120.0  # no further candidate is tried once the failed ones have taken this long
INPUT_BYTES_LIMIT = 2**30
CHOSEN_BYTES_LIMIT = 64 * 2**20

_ITEM_BYTES = {
    onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
}


class ShapeError(FoldError):
    """An input shape problem; `input` names the input when one is at fault."""


@dataclass(frozen=True)
class Symbol:
    """A dynamic dim: `name` is its dim_param ("" for an unnamed dim); role is "batch" or "size"."""

    name: str
    role: str


@dataclass(frozen=True)
class InputSpec:
    """One graph input verification feeds: dims holds an int for a known size, a Symbol for a dynamic one."""

    name: str
    elem_type: int
    dims: tuple


def input_specs(model, shapes):
    """The InputSpec of every graph input that is not an initializer, with the caller's `shapes` applied.

    `shapes` ({input name: [dims]}, checked) replaces an input's declared dims; a named dim it gives a size
    to takes that size in every other input too. Raises ShapeError for a shape that contradicts the model,
    an input declared without a shape, or an invalid declared dim, each with a way out.
    """
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    unknown = sorted(set(shapes) - {i.name for i in graph_inputs})
    if unknown:
        raise FoldError("a shape was given for %s, which is not an input of the model (its inputs: %s)"
                        % (", ".join(repr(n) for n in unknown), ", ".join(i.name for i in graph_inputs) or "none"))
    declared, bound = {}, {}
    for value_info in graph_inputs:
        name = value_info.name
        if not value_info.type.HasField("tensor_type"):
            raise FoldError("input %r is not a tensor; verification feeds tensors only (skip it with <<no_verify>>)"
                            % name)
        tensor_type = value_info.type.tensor_type
        if name in shapes:
            declared[name] = _given_dims(name, tensor_type, shapes[name], bound)
        elif not tensor_type.HasField("shape"):
            raise _needs_shape(name, "declares no shape, not even its rank")
        else:
            declared[name] = _declared_dims(name, tensor_type.shape.dim)

    batch_names = {dims[0] for dims in declared.values() if dims and isinstance(dims[0], str) and dims[0]}
    specs = []
    for value_info in graph_inputs:
        dims = []
        for axis, dim in enumerate(declared[value_info.name]):
            if isinstance(dim, int):
                dims.append(dim)
            elif dim in bound:
                dims.append(bound[dim])
            else:
                role = "batch" if (axis == 0 if dim == "" else dim in batch_names) else "size"
                dims.append(Symbol(dim, role))
        specs.append(InputSpec(value_info.name, value_info.type.tensor_type.elem_type, tuple(dims)))
    return specs


def symbols(specs):
    """The distinct Symbols of `specs`, in order of appearance."""
    seen = {}
    for spec in specs:
        for dim in spec.dims:
            if isinstance(dim, Symbol):
                seen.setdefault(dim, None)
    return list(seen)


def concrete_shapes(specs, sizes):
    """{input name: [dims]} with each Symbol replaced by its size in `sizes` ({Symbol: int})."""
    return {spec.name: [sizes[d] if isinstance(d, Symbol) else d for d in spec.dims] for spec in specs}


def chosen_axes(specs):
    """{input name: [axes]} of the dims whose size verification chooses."""
    chosen = {}
    for spec in specs:
        axes = [axis for axis, dim in enumerate(spec.dims) if isinstance(dim, Symbol)]
        if axes:
            chosen[spec.name] = axes
    return chosen


def input_bytes(specs, shapes):
    """How many bytes the inputs take at `shapes` (Python ints: no overflow)."""
    return sum(math.prod(shapes[spec.name]) * _ITEM_BYTES.get(spec.elem_type, 8) for spec in specs)


def check_input_bytes(specs, shapes, where):
    """ShapeError when the inputs at `shapes` would take more than INPUT_BYTES_LIMIT."""
    total = input_bytes(specs, shapes)
    if total > INPUT_BYTES_LIMIT:
        listing = ", ".join("%s=%s" % (name, format_dims(dims)) for name, dims in shapes.items())
        message = ("the inputs %s (%s) would take %s bytes for verification, more than its limit of %s; "
                   % (where, listing, format(total, ","), format(INPUT_BYTES_LIMIT, ",")))
        raise ShapeError(message + "give smaller shapes with <<shapes>>, or skip verification with <<no_verify>>",
                         limit=INPUT_BYTES_LIMIT, needed=total)


def first_candidates(specs, model):
    """Size assignments ({Symbol: int}) to try, in order, until the original model runs."""
    free = symbols(specs)
    ladder = size_ladder(model)
    batch = [s for s in free if s.role == "batch"]
    sizes = [s for s in free if s.role == "size"]
    seen, candidates = set(), []
    batch_ladder = list(BATCH_SIZES) + [size for size in ladder[len(SIZE_LADDER):] if size not in BATCH_SIZES]
    for b in batch_ladder if batch else (None,):
        for size in ladder if sizes else (None,):
            assignment = {s: (b if s.role == "batch" else size) for s in free}
            key = tuple(assignment.values())
            if key not in seen:
                seen.add(key)
                candidates.append(assignment)
    return _affordable(specs, candidates)[:FIRST_SHAPE_ATTEMPTS]


def second_candidates(specs, model, first):
    """Assignments to try for the second shape: batch and sizes both differ from `first` if possible, then
    one of them."""
    free = symbols(specs)
    ladder = size_ladder(model)
    batch = [s for s in free if s.role == "batch"]
    sizes = [s for s in free if s.role == "size"]
    b1 = first[batch[0]] if batch else None
    s1 = first[sizes[0]] if sizes else None
    b2 = (2 if b1 == 1 else 1) if batch else None
    other_sizes = [s for s in ladder if s != s1] if sizes else [None]
    both = SECOND_SHAPE_ATTEMPTS // 2 if batch and sizes else SECOND_SHAPE_ATTEMPTS
    pairs = [(b2, s) for s in other_sizes[:both]]
    if batch and sizes:
        pairs += [(b2, s1)] + [(b1, s) for s in other_sizes]
    candidates = [{s: (b if s.role == "batch" else size) for s in free} for b, size in pairs]
    return _affordable(specs, candidates)[:SECOND_SHAPE_ATTEMPTS]


def size_ladder(model):
    """SIZE_LADDER, then the sizes most common in the model's initializers (their dims, and the values of
    small integer ones: the target shapes of Reshape, Expand, ...) not already in it."""
    counts = Counter()
    for tensor in model.graph.initializer:
        sizes = list(tensor.dims)
        if (tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and math.prod(tensor.dims) <= 8
                and tensor.data_location != onnx.TensorProto.EXTERNAL):
            sizes += [int(v) for v in numpy_helper.to_array(tensor).ravel()]
        counts.update(d for d in sizes if 1 < d <= 1024 and d not in SIZE_LADDER)
    return list(SIZE_LADDER) + [size for size, _ in counts.most_common(MODEL_SIZES)]


def format_dims(dims):
    return "[" + ",".join(str(d) for d in dims) + "]"


def _affordable(specs, candidates):
    return [c for c in candidates if input_bytes(specs, concrete_shapes(specs, c)) <= CHOSEN_BYTES_LIMIT]


def _declared_dims(name, dims):
    """Per axis: an int for a fixed size, the dim_param ("" when unnamed) for a dynamic one."""
    declared = []
    for axis, dim in enumerate(dims):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            declared.append(int(dim.dim_value))
        elif dim.HasField("dim_value") and dim.dim_value < -1:
            raise _needs_shape(name, "declares dim %d at axis %d, which is invalid (a dim is a size >= 1, or a "
                               "name, 0 or -1 for a dynamic one)" % (dim.dim_value, axis))
        else:
            declared.append(dim.dim_param if dim.HasField("dim_param") else "")
    return declared


def _given_dims(name, tensor_type, given, bound):
    """The caller's dims for an input, checked against the declared ones; records in `bound` the size each
    of its named dims takes."""
    if tensor_type.HasField("shape"):
        dims = tensor_type.shape.dim
        if len(given) != len(dims):
            raise FoldError("the shape given for input %r has %d dims; the model's input has %d"
                            % (name, len(given), len(dims)))
        for axis, (dim, size) in enumerate(zip(dims, given)):
            if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != size:
                raise FoldError("the shape given for input %r has %d at axis %d, where the model fixes %d"
                                % (name, size, axis, dim.dim_value))
            if dim.HasField("dim_param") and dim.dim_param:
                if bound.setdefault(dim.dim_param, size) != size:
                    raise FoldError("the shapes given set the model's dim %r to both %d and %d"
                                    % (dim.dim_param, bound[dim.dim_param], size))
    return list(given)


def _needs_shape(name, problem):
    message = "input %r %s; " % (name, problem)
    return ShapeError(message + "give its shape with <<shape_of>>", input=name)
