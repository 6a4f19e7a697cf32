"""Proof that a folded model computes what the original computes: both run in onnxruntime, compared.

`verify` (public as foldnorm.verify) runs the original and the folded model in onnxruntime's CPU provider
with every graph optimization DISABLED (ORT_DISABLE_ALL), so the check tests our folding and not
onnxruntime's own, on the same seeded random inputs, and compares every graph output.

Inputs, one array per graph input that is not an initializer, drawn from `numpy.random.default_rng(seed)`
in graph-input order:
- float16 / bfloat16 / float / double: standard normal values, rounded to the input's dtype;
- integer types: uniform integers in [0, 4) (small, so that they stay valid as indices);
- bool: True or False with equal probability.
Shapes: a fixed dim keeps its size; a dynamic dim takes its size from `shapes` ({input name: [dims]});
without one, a dynamic FIRST dim (the batch) is `default_dim` (1 unless told) and the report says so; any
other dynamic dim, or an input with no shape at all, needs `shapes` and is otherwise refused (FoldError).

Tolerance, per output (an element passes when |folded - original| <= atol + rtol * |original|):
- rtol: the caller's, else 1e-4 for float32/float64 outputs, 1e-2 for float16/bfloat16, 0 for integer and
  bool outputs (which must match exactly).
- atol: the caller's, else rtol * max|original| over the output's finite elements (the output's own
  scale, at least the dtype's smallest normal number). Folding moves rounding by a few ulps of the values
  that were summed, which scale with the output's magnitude; an absolute floor relative to that magnitude
  keeps elements that happen to be near zero from failing on rounding alone.
NaN matches NaN and an infinity matches the same infinity; anything else non-finite that differs fails.
`max_rel_error` is max|folded - original| / max|original| (the error relative to the output's largest
magnitude: element-wise ratios mean nothing next to zeros). With the default atol, an output whose
max_rel_error is at most its rtol always passes.
"""
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import FoldError
from .modelio import PROTOBUF_LIMIT, all_tensors, as_model

DEFAULT_RTOL = {"float32": 1e-4, "float64": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
INTEGER_INPUT_HIGH = 4

_FLOAT_INPUT_TYPES = {
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
}
_INTEGER_INPUT_TYPES = {
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.UINT64: np.uint64,
}


@dataclass
class OutputComparison:
    """How one graph output of the folded model compares with the original's."""

    name: str
    max_abs_error: float
    max_rel_error: float
    passed: bool
    dtype: str = ""
    rtol: float = 0.0
    atol: float = 0.0
    note: str = ""  # why an output failed beyond its numbers (a different shape, a missing output, ...)

    def to_dict(self):
        return {
            "name": self.name,
            "dtype": self.dtype,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "rtol": _json_float(self.rtol),
            "atol": _json_float(self.atol),
            "passed": self.passed,
            "note": self.note,
        }


@dataclass
class VerifyReport:
    """The outcome of `verify`.

    rtol / atol are the caller's tolerances, or, when defaulted, the largest used for any output (each
    output's own are in `outputs`). input_shapes are the shapes actually fed; dynamic_dims names, per
    input, the axes that were dynamic and took `default_dim` because `shapes` did not give them.
    """

    passed: bool
    rtol: float
    atol: float
    input_shapes: dict
    outputs: list
    seconds: float
    default_dim: int = 1
    dynamic_dims: dict = field(default_factory=dict)

    @property
    def failed_outputs(self):
        return [o for o in self.outputs if not o.passed]

    def to_dict(self):
        return {
            "passed": self.passed,
            "rtol": _json_float(self.rtol),
            "atol": _json_float(self.atol),
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "default_dim": self.default_dim,
            "dynamic_dims": {k: list(v) for k, v in self.dynamic_dims.items()},
            "outputs": [o.to_dict() for o in self.outputs],
            "seconds": self.seconds,
        }

    def format_text(self):
        lines = [
            "verification against onnxruntime (graph optimizations disabled): %s in %.2f s"
            % ("passed" if self.passed else "FAILED", self.seconds)
        ]
        inputs = ", ".join("%s=%s" % (k, _format_dims(v)) for k, v in self.input_shapes.items())
        lines.append("  inputs: %s" % (inputs or "(none)"))
        if self.dynamic_dims:
            where = ", ".join("%s axis %s" % (k, ",".join(map(str, v))) for k, v in self.dynamic_dims.items())
            lines.append("  dynamic dims set to %d (%s); --shape NAME=d0,d1,... sets them" % (self.default_dim, where))
        width = max([len("output")] + [len(o.name) for o in self.outputs])
        row = "  %-*s  %-12s  %-12s  %-24s  %s"
        lines.append(row % (width, "output", "max abs err", "max rel err", "tolerance", "result"))
        for o in self.outputs:
            tolerance = "rtol %.0e atol %.1e" % (o.rtol, o.atol)
            result = "ok" if o.passed else "DIVERGED" + (" (%s)" % o.note if o.note else "")
            errors = _format_error(o.max_abs_error), _format_error(o.max_rel_error)
            lines.append(row % ((width, o.name) + errors + (tolerance, result)))
        return "\n".join(lines)


def verify(original, folded, *, shapes=None, rtol=None, atol=None, seed=0, default_dim=1):
    """Run `original` and `folded` (ModelProtos or paths) in onnxruntime and compare every output.

    Returns a VerifyReport; a mismatch never raises (the caller decides what to do with it). Raises
    FoldError when a model cannot be run: an input whose shape is unknown, an input type verification
    cannot generate, a model onnxruntime refuses. See the module docstring for inputs and tolerances.
    """
    start = time.perf_counter()
    rtol = _check_tolerance(rtol, "rtol")
    atol = _check_tolerance(atol, "atol")
    default_dim = _check_default_dim(default_dim)
    original, _ = as_model(original, "original", check=False)
    folded, _ = as_model(folded, "folded", check=False)

    feeds, input_shapes, dynamic_dims = make_inputs(original, shapes=shapes, seed=seed, default_dim=default_dim)
    expected = run_model(original, feeds, "original")
    actual = run_model(folded, feeds, "folded")

    comparisons = []
    for name, reference in expected.items():
        if name not in actual:
            comparisons.append(_diverged(name, _dtype_name(reference), "missing from the folded model"))
            continue
        comparisons.append(compare_output(name, reference, actual[name], rtol=rtol, atol=atol))
    return VerifyReport(
        passed=all(c.passed for c in comparisons),
        rtol=rtol if rtol is not None else max((c.rtol for c in comparisons), default=0.0),
        atol=atol if atol is not None else max((c.atol for c in comparisons), default=0.0),
        input_shapes=input_shapes,
        outputs=comparisons,
        seconds=time.perf_counter() - start,
        default_dim=default_dim,
        dynamic_dims=dynamic_dims,
    )


def make_inputs(model, *, shapes=None, seed=0, default_dim=1):
    """Seeded random inputs for every graph input that is not an initializer.

    Returns (feeds {name: array}, shapes {name: [dims]}, dynamic dims that took default_dim {name: [axes]}).
    bfloat16 inputs are returned as ml_dtypes.bfloat16 arrays.
    """
    shapes = _check_shapes(shapes)
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    unknown = sorted(set(shapes) - {i.name for i in graph_inputs})
    if unknown:
        raise FoldError(
            "a shape was given for %s, which is not an input of the model (its inputs: %s)"
            % (", ".join(repr(n) for n in unknown), ", ".join(i.name for i in graph_inputs) or "none")
        )
    rng = np.random.default_rng(seed)
    feeds, used_shapes, dynamic_dims = {}, {}, {}
    for value_info in graph_inputs:
        name = value_info.name
        if not value_info.type.HasField("tensor_type"):
            raise FoldError("input %r is not a tensor; verification feeds tensors only (skip it with --no-verify)"
                            % name)
        elem_type = value_info.type.tensor_type.elem_type
        dims, defaulted = _input_shape(value_info, shapes.get(name), default_dim)
        feeds[name] = _random_tensor(rng, elem_type, dims, name)
        used_shapes[name] = dims
        if defaulted:
            dynamic_dims[name] = defaulted
    return feeds, used_shapes, dynamic_dims


def run_model(model, feeds, label="model"):
    """Run a ModelProto in onnxruntime (CPU, graph optimizations disabled); {output name: array}.

    bfloat16 graph inputs and outputs travel as float32 through Cast nodes added to a copy of the model
    (onnxruntime's Python binding has no bfloat16 arrays); both casts are exact for bfloat16 values.
    """
    import onnxruntime as ort

    runnable, bfloat16_outputs = _with_bfloat16_casts(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    run_feeds = {}
    for name, array in feeds.items():
        run_feeds[_bfloat16_feed_name(name) if _is_bfloat16(array) else name] = (
            array.astype(np.float32) if _is_bfloat16(array) else array
        )
    try:
        with tempfile.TemporaryDirectory(prefix="foldnorm-verify-") as folder:
            session = ort.InferenceSession(_session_source(runnable, folder), options,
                                           providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            values = session.run(names, run_feeds)
    except FoldError:
        raise
    except Exception as error:
        raise FoldError("onnxruntime cannot run the %s model: %s" % (label, _first_line(error))) from None
    outputs = {}
    for name, value in zip(names, values):
        if name in bfloat16_outputs:
            name, value = bfloat16_outputs[name], np.asarray(value).astype(_bfloat16_dtype())
        outputs[name] = value
    return outputs


def compare_output(name, reference, candidate, *, rtol=None, atol=None):
    """Compare one output (an array, or a sequence of arrays) of the folded model with the original's."""
    if isinstance(reference, (list, tuple)) or isinstance(candidate, (list, tuple)):
        return _compare_sequence(name, reference, candidate, rtol, atol)
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    dtype = _dtype_name(reference)
    if candidate.dtype != reference.dtype:
        return _diverged(name, dtype, "dtype %s, original %s" % (_dtype_name(candidate), dtype))
    if candidate.shape != reference.shape:
        return _diverged(name, dtype, "shape %s, original %s" % (candidate.shape, reference.shape))
    if reference.dtype.kind not in "fiub" and dtype != "bfloat16":
        if np.array_equal(reference, candidate):
            return OutputComparison(name, 0.0, 0.0, True, dtype)
        return _diverged(name, dtype, "values differ")

    is_float = reference.dtype.kind == "f" or dtype == "bfloat16"
    out_rtol = rtol if rtol is not None else DEFAULT_RTOL.get(dtype, 0.0) if is_float else 0.0
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    finite = np.isfinite(ref)
    magnitude = float(np.abs(ref[finite]).max()) if finite.any() else 0.0
    if atol is not None:
        out_atol = atol
    elif is_float:
        smallest_normal = float(np.finfo(np.float32 if dtype == "bfloat16" else reference.dtype).tiny)
        out_atol = out_rtol * max(magnitude, smallest_normal)
    else:
        out_atol = 0.0

    same = (ref == got) | (np.isnan(ref) & np.isnan(got))
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.where(same, 0.0, np.abs(got - ref))
    error = np.where(np.isnan(error), math.inf, error)
    max_abs = float(error.max()) if error.size else 0.0
    if max_abs == 0.0:
        max_rel = 0.0
    elif magnitude > 0.0:
        max_rel = max_abs / magnitude
    else:
        max_rel = math.inf
    with np.errstate(invalid="ignore"):
        passed = bool(np.all(error <= out_atol + out_rtol * np.abs(np.where(finite, ref, 0.0))))
    return OutputComparison(name, max_abs, max_rel, passed, dtype, out_rtol, out_atol)


def _diverged(name, dtype, note):
    return OutputComparison(name, math.inf, math.inf, False, dtype, note=note)


def _compare_sequence(name, reference, candidate, rtol, atol):
    if not isinstance(reference, (list, tuple)) or not isinstance(candidate, (list, tuple)):
        return _diverged(name, "sequence", "a sequence in only one model")
    if len(reference) != len(candidate):
        return _diverged(name, "sequence", "%d elements, original %d" % (len(candidate), len(reference)))
    parts = [compare_output("%s[%d]" % (name, i), r, c, rtol=rtol, atol=atol)
             for i, (r, c) in enumerate(zip(reference, candidate))]
    failed = [p for p in parts if not p.passed]
    return OutputComparison(
        name,
        max((p.max_abs_error for p in parts), default=0.0),
        max((p.max_rel_error for p in parts), default=0.0),
        not failed,
        "sequence(%s)" % (parts[0].dtype if parts else ""),
        max((p.rtol for p in parts), default=0.0),
        max((p.atol for p in parts), default=0.0),
        note="; ".join("%s: %s" % (p.name, p.note or "beyond tolerance") for p in failed[:3]),
    )


def _input_shape(value_info, given, default_dim):
    name = value_info.name
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        if given is None:
            raise FoldError("input %r has no shape in the model; give one with --shape %s=d0,d1,..." % (name, name))
        return list(given), []
    dims = tensor_type.shape.dim
    if given is not None:
        if len(given) != len(dims):
            raise FoldError("the shape given for input %r has %d dims; the model's input has %d"
                            % (name, len(given), len(dims)))
        for axis, (dim, size) in enumerate(zip(dims, given)):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise FoldError("the shape given for input %r has %d at axis %d, where the model fixes %d"
                                % (name, size, axis, dim.dim_value))
        return list(given), []
    shape, defaulted = [], []
    for axis, dim in enumerate(dims):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(dim.dim_value)
        elif dim.HasField("dim_value") and dim.dim_value == 0:
            shape.append(0)
        elif axis == 0:
            shape.append(default_dim)
            defaulted.append(axis)
        else:
            label = (" (%r)" % dim.dim_param) if dim.dim_param else ""
            raise FoldError("input %r has a dynamic dim at axis %d%s; give its shape with --shape %s=d0,d1,..."
                            % (name, axis, label, name))
    return shape, defaulted


def _random_tensor(rng, elem_type, shape, name):
    if elem_type in _FLOAT_INPUT_TYPES:
        return rng.standard_normal(shape).astype(_FLOAT_INPUT_TYPES[elem_type])
    if elem_type == onnx.TensorProto.BFLOAT16:
        return rng.standard_normal(shape).astype(np.float32).astype(_bfloat16_dtype())
    if elem_type in _INTEGER_INPUT_TYPES:
        return rng.integers(0, INTEGER_INPUT_HIGH, size=shape).astype(_INTEGER_INPUT_TYPES[elem_type])
    if elem_type == onnx.TensorProto.BOOL:
        return rng.random(shape) < 0.5
    known = elem_type in onnx.TensorProto.DataType.values()
    type_name = onnx.TensorProto.DataType.Name(elem_type) if known else str(elem_type)
    raise FoldError("input %r has element type %s, for which verification cannot make inputs (use --no-verify)"
                    % (name, type_name))


def _bfloat16_dtype():
    try:
        import ml_dtypes
    except ImportError:
        raise FoldError("this model has bfloat16 inputs or outputs; verifying them needs the ml_dtypes package"
                        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def _is_bfloat16(array):
    return array.dtype.name == "bfloat16"


def _bfloat16_feed_name(name):
    return name + "__foldnorm_float32"


def _with_bfloat16_casts(model):
    """A copy of `model` whose bfloat16 graph inputs/outputs are float32, through exact Cast nodes.

    Returns (model, {float32 output name: original output name}); `model` itself when it has none.
    """
    bf16 = onnx.TensorProto.BFLOAT16
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers and i.type.tensor_type.elem_type == bf16]
    outputs = [o.name for o in model.graph.output
               if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type == bf16]
    if not inputs and not outputs:
        return model, {}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    casts = []
    for value_info in graph.input:
        if value_info.name in inputs:
            casts.append(helper.make_node("Cast", [_bfloat16_feed_name(value_info.name)], [value_info.name], to=bf16))
            value_info.name = _bfloat16_feed_name(value_info.name)
            value_info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    renamed = {}
    for value_info in graph.output:
        if value_info.name in outputs:
            float_name = value_info.name + "__foldnorm_float32"
            graph.node.append(helper.make_node("Cast", [value_info.name], [float_name], to=onnx.TensorProto.FLOAT))
            renamed[float_name] = value_info.name
            value_info.name = float_name
            value_info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return copy, renamed


def _session_source(model, folder):
    """What onnxruntime loads: the serialized model, or a file with external data when it is too large."""
    from .modelio import onnxruntime_source  # neither a full serialization to learn the size nor a change to the model

    return onnxruntime_source(model, folder)


def _check_tolerance(value, name):
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError("%s must be a number, got %r" % (name, value)) from None
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError("%s must be a finite non-negative number, got %r" % (name, value))
    return value


def _check_default_dim(value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError("default_dim must be a positive int, got %r" % (value,))
    return int(value)


def _check_shapes(shapes):
    """{name: [dims]} with non-negative int dims, or {} for None."""
    if shapes is None:
        return {}
    if not isinstance(shapes, dict):
        raise TypeError("shapes must be a dict {input name: [dims]}, got %s" % type(shapes).__name__)
    checked = {}
    for name, dims in shapes.items():
        try:
            dims = [int(d) for d in dims]
        except (TypeError, ValueError):
            raise FoldError("the shape for input %r must be a list of ints, got %r" % (name, dims)) from None
        if any(d < 0 for d in dims):
            raise FoldError("the shape for input %r must not have negative dims, got %s" % (name, dims))
        checked[name] = dims
    return checked


def _dtype_name(array):
    if isinstance(array, (list, tuple)):
        return "sequence"
    return np.asarray(array).dtype.name


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _format_dims(dims):
    return "[" + ",".join(str(d) for d in dims) + "]"


def _format_error(value):
    return "inf" if math.isinf(value) else "nan" if math.isnan(value) else "%.3g" % value


def _json_float(value):
    """A float for JSON: non-finite values (a diverged output) become None, which JSON can represent."""
    return float(value) if math.isfinite(value) else None
