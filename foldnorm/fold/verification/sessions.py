"""What verification hands onnxruntime for each model, and the sessions it runs them in.

Verification opens up to three sessions of a model pair (the original at its shapes, the folded model, the
original with optimizations on, for its rounding noise), one after another: each is closed before the next
opens, so that onnxruntime holds one model's weights at a time. What a session of a model reads is decided
once per model (`ModelSource`):

- a model given as a path: that file, which onnxruntime reads with its external data itself (mapping the
  large tensors from the file where their offsets allow). foldnorm reads only the model's structure and
  its small tensors (modelio.read_structure checks the model as load_model does, and validates every
  external data location and size before onnxruntime is handed the path). The model is read whole
  instead, as before, when onnxruntime cannot run the file as it is (a graph input declaring a size of 0,
  a bfloat16 graph input or output: both need a rewritten copy, see below), or when it has QuantizeLinear
  nodes and tensors in external data (verification then reads quantization scales and may run a copy of
  it with more outputs: foldnorm.fold.quantized.steps);
- a ModelProto with up to FILE_SOURCE_BYTES of tensor data: its serialized bytes;
- a larger one: a copy written once into a temporary folder, its large tensors in external data (aligned,
  so that onnxruntime maps them), read by every session of that model.

onnxruntime's Python binding has no bfloat16 arrays: bfloat16 graph inputs and outputs travel as float32
through Cast nodes added to a copy of the model; both casts are exact for bfloat16 values. A graph input
declaring a dim of size 0 is dynamic to foldnorm (some exporters write it so), but onnxruntime would insist
on that size: the copy it runs declares no size there.
"""
import contextlib
import gc
import os

import numpy as np
import onnx
from onnx import helper

from ..errors import FoldError
from ..io.external_data import all_tensors, data_bytes, is_external, load_into, without_data
from ..io.messages import one_line
from ..io.modelio import load_model, onnxruntime_source, read_structure, save_model
from ..io.scratch import temporary_folder
from ..io.proto import tensor_nbytes

# onnxruntime's severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. Its errors reach the caller as
# exceptions, which foldnorm turns into one line; its log lines would only repeat them, with source paths.
ORT_LOG_SEVERITY = 4
# Tensor data past which a ModelProto reaches onnxruntime through a file written once, not as serialized
# bytes for each session (which cost a copy of the model in Python beside onnxruntime's own).
FILE_SOURCE_BYTES = 64 * 2**20


class ModelSource:
    """One model as verification's sessions read it (see the module's docstring); a context manager that
    removes the copy it may write. `model` is the ModelProto: for a path handed to onnxruntime as it is,
    its structure and small tensors only (the data of the large ones stays in their files)."""

    def __init__(self, model, path=None):
        self.model = model
        self.path = path
        self._stack = contextlib.ExitStack()
        self._folder = None
        self._file = None
        self._bfloat16_outputs = {}

    @classmethod
    def open(cls, model_or_path, name):
        """The ModelSource of a verify() argument: a ModelProto (taken as it is) or a path."""
        if isinstance(model_or_path, onnx.ModelProto):
            return cls(model_or_path)
        if not isinstance(model_or_path, (str, os.PathLike)):
            raise TypeError("%s must be an onnx.ModelProto or a path, got %s" % (name, type(model_or_path).__name__))
        opened, unread = read_structure(model_or_path)
        model = opened.model
        quantized = _has_quantize_linear(model)
        if _needs_rewriting(model) or (quantized and unread):
            load_into(unread, model_or_path)
            return cls(model)
        if not quantized and _inline_bytes(model) > FILE_SOURCE_BYTES:
            model = without_data(model)  # onnxruntime reads the file; verification needs dims and types only
        return cls(model, os.fspath(model_or_path))

    @classmethod
    def of_structure(cls, structure, path):
        """The ModelSource of the file at `path` (read and checked by its session already) given its
        structure (io.external_data.without_data): onnxruntime reads the file, and foldnorm does not read it
        again unless onnxruntime cannot run it as it is (then it is loaded whole, as open() does)."""
        if _needs_rewriting(structure) or (_has_quantize_linear(structure)
                                           and any(is_external(t) for t in all_tensors(structure))):
            return cls(load_model(path))
        return cls(structure, os.fspath(path))

    def full_model(self):
        """The model with all its tensor data (read again from its file when onnxruntime was to read it)."""
        if self.path is None:
            return self.model
        return load_model(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Remove the copy written for onnxruntime, if any."""
        self._file = self._folder = None
        self._stack.close()

    def session(self, label, *, optimized):
        """A Session of the model, all graph optimizations on when `optimized`, else none; FoldError (one
        line) when onnxruntime refuses the model."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        options.log_severity_level = ORT_LOG_SEVERITY
        try:
            source = self._source()
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except FoldError:
            raise
        except Exception as error:
            kind = MissingKernel if type(error).__name__ == "NotImplemented" else FoldError
            raise kind("onnxruntime cannot load the %s model: %s" % (label, one_line(error))) from None
        return Session(session, self._bfloat16_outputs)

    def _source(self):
        if self.path is not None:
            return self.path
        if self._file is not None:
            return self._file
        runnable, self._bfloat16_outputs = with_bfloat16_casts(without_zero_dims(self.model))
        if self._folder is None:
            self._folder = self._stack.enter_context(temporary_folder())
        if data_bytes(runnable) <= FILE_SOURCE_BYTES:
            return onnxruntime_source(runnable, self._folder)
        self._file = self._write(runnable)
        return self._file

    def _write(self, model):
        """Write `model` into the folder for onnxruntime, its large tensors in external data; returns its path."""
        path = os.path.join(self._folder, "model.onnx")
        try:
            save_model(model, path, external_data=True)
        except OSError as error:
            raise FoldError("cannot write a copy of the model for onnxruntime in %s: %s"
                            % (self._folder, error.strerror or error)) from None
        return path


class MissingKernel(FoldError):
    """onnxruntime has no kernel for an op of the model (a double Conv, for instance)."""


class Session:
    """An onnxruntime session of one model, with the bfloat16 casts the feeds and outputs need."""

    def __init__(self, inference_session, bfloat16_outputs):
        self.session = inference_session
        self.bfloat16_outputs = bfloat16_outputs
        self.names = [o.name for o in inference_session.get_outputs()]

    def run(self, feeds):
        run_feeds = {}
        for name, array in feeds.items():
            if is_bfloat16(array):
                run_feeds[_bfloat16_feed_name(name)] = array.astype(np.float32)
            else:
                run_feeds[name] = array
        values = self.session.run(self.names, run_feeds)
        outputs = {}
        for name, value in zip(self.names, values):
            if name in self.bfloat16_outputs:
                name, value = self.bfloat16_outputs[name], np.asarray(value).astype(bfloat16_dtype())
            outputs[name] = value
        return outputs


def _needs_rewriting(model):
    inputs, outputs = _bfloat16_inputs_and_outputs(model)
    return _has_zero_dims(model) or bool(inputs or outputs)


def _has_quantize_linear(model):
    return any(node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx") for node in model.graph.node)


def _inline_bytes(model):
    return sum(tensor_nbytes(t) for t in all_tensors(model) if not is_external(t))


def bfloat16_dtype():
    try:
        import ml_dtypes
    except ImportError:
        raise FoldError("this model has bfloat16 inputs or outputs; verifying them needs the ml_dtypes package"
                        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(array):
    return array.dtype.name == "bfloat16"


def _bfloat16_feed_name(name):
    return name + "__foldnorm_float32"


def _bfloat16_inputs_and_outputs(model):
    bf16 = onnx.TensorProto.BFLOAT16
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers and i.type.tensor_type.elem_type == bf16]
    outputs = [o.name for o in model.graph.output
               if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type == bf16]
    return inputs, outputs


def with_bfloat16_casts(model):
    """A copy of `model` whose bfloat16 graph inputs/outputs are float32, through exact Cast nodes.

    Returns (model, {float32 output name: original output name}); `model` itself when it has none.
    """
    inputs, outputs = _bfloat16_inputs_and_outputs(model)
    if not inputs and not outputs:
        return model, {}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    casts = []
    for value_info in graph.input:
        if value_info.name in inputs:
            casts.append(helper.make_node("Cast", [_bfloat16_feed_name(value_info.name)], [value_info.name],
                                          to=onnx.TensorProto.BFLOAT16))
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


def _has_zero_dims(model):
    return any(dim.HasField("dim_value") and dim.dim_value == 0
               for value_info in model.graph.input for dim in value_info.type.tensor_type.shape.dim)


def without_zero_dims(model):
    """`model`, or a copy whose graph inputs declare no dim_value 0."""
    if not _has_zero_dims(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value_info in copy.graph.input:
        for dim in value_info.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value == 0:
                dim.Clear()
    return copy


def run_model(model, feeds, label="model", *, optimized=False):
    """Run a ModelProto in onnxruntime's CPU provider; {output name: array}.

    Graph optimizations are disabled unless `optimized`. bfloat16 graph inputs and outputs travel as
    float32 through Cast nodes added to a copy of the model (onnxruntime's Python binding has no bfloat16
    arrays); both casts are exact for bfloat16 values. Raises FoldError when onnxruntime cannot run it.
    """
    with ModelSource(model) as source:
        outputs, error = run_all(source, label, [feeds], optimized=optimized)
    if error is not None:
        raise FoldError(error)
    return outputs[0]


def run_all(source, label, feeds_list, *, optimized):
    """([outputs per feeds], None), or (None, a sentence saying why) when onnxruntime cannot load or run the
    model."""
    session = None
    try:
        session = source.session(label, optimized=optimized)
        return [session.run(feeds) for feeds in feeds_list], None
    except FoldError as error:
        return None, str(error)
    except Exception as error:
        return None, "onnxruntime cannot run the %s model: %s" % (label, one_line(error))
    finally:
        del session
        gc.collect()  # no two sessions hold their weights at once
