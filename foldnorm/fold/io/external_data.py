"""Tensor data kept apart from a model's structure: external data files, and copies without the data.

A model of hundreds of megabytes is nearly all tensor data, which the ONNX checker, shape inference and
the model file itself do not need in the protobuf. `copy_without_data` copies everything else (graph,
subgraphs, functions, small tensors) and lets the caller decide where each large tensor's data goes: to
an external data file being written (save_model), or to a placeholder (checking and shape inference of a
model whose data need not be copied or serialized again).

External data locations a model file names are validated here before a byte is read: a model file is
untrusted input, and a location is a path it asks us to open.
"""
import errno
import os

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import FoldError
from .proto import is_deferred, tensor_nbytes, tensor_to_array

# Tensors smaller than this stay inside the model file (onnx's own default when writing external data).
EXTERNAL_DATA_THRESHOLD = 1024
# A large tensor starts at a multiple of this in the data file, so that onnxruntime can map it from the
# file instead of copying it (64 KiB is the mapping granularity on every platform it runs on).
LARGE_TENSOR_BYTES = 2**20
LARGE_TENSOR_ALIGNMENT = 2**16
SMALL_TENSOR_ALIGNMENT = 64
PLACEHOLDER_LOCATION = "foldnorm-tensor-data"

_DATA_FIELDS = ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data",
                "string_data", "external_data", "data_location")
# Element types whose raw bytes are a little-endian NumPy array of this dtype.
_RAW_LAYOUT = {elem_type: np.dtype(code) for elem_type, code in (
    (TensorProto.FLOAT, "<f4"), (TensorProto.DOUBLE, "<f8"), (TensorProto.FLOAT16, "<f2"),
    (TensorProto.INT8, "i1"), (TensorProto.INT16, "<i2"), (TensorProto.INT32, "<i4"), (TensorProto.INT64, "<i8"),
    (TensorProto.UINT8, "u1"), (TensorProto.UINT16, "<u2"), (TensorProto.UINT32, "<u4"),
    (TensorProto.UINT64, "<u8"), (TensorProto.BOOL, "?"))}
_RAW_CONVERTIBLE = {
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
    TensorProto.BOOL,
}


# ---------------------------------------------------------------------------------------- every tensor

def all_tensors(model):
    """Every TensorProto a model holds: initializers, sparse ones, Constant-like attributes, subgraphs, training
    graphs, functions."""
    yield from _graph_tensors(model.graph)
    for training_info in model.training_info:
        yield from _graph_tensors(training_info.initialization)
        yield from _graph_tensors(training_info.algorithm)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node):
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        for sparse in attribute.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for subgraph in attribute.graphs:
            yield from _graph_tensors(subgraph)


def is_external(tensor):
    return tensor.data_location == TensorProto.EXTERNAL


def data_bytes(model):
    """The bytes of all the model's tensor data, from dims and types (nothing decoded or serialized)."""
    return sum(tensor_nbytes(tensor) for tensor in all_tensors(model))


# ------------------------------------------------------------------------- copies without tensor data

def copy_without_data(model, place):
    """A copy of `model` in which each tensor for which `place(tensor)` returns (location, offset,
    length) has no data of its own but points to external data there; `place` returning None keeps the
    tensor as it is. The large tensors' data is never copied: the copy costs the model's structure."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip=("graph", "functions", "training_info"))
    if model.HasField("graph"):
        _copy_graph(model.graph, copy.graph, place)
    for training_info in model.training_info:
        target = copy.training_info.add()
        _copy_fields(training_info, target, skip=("initialization", "algorithm"))
        if training_info.HasField("initialization"):
            _copy_graph(training_info.initialization, target.initialization, place)
        if training_info.HasField("algorithm"):
            _copy_graph(training_info.algorithm, target.algorithm, place)
    for function in model.functions:
        target = copy.functions.add()
        _copy_fields(function, target, skip=("node",))
        for node in function.node:
            _copy_node(node, target.node.add(), place)
    return copy


def placeholder_place(tensor):
    """A `place` for copy_without_data that points every tensor of EXTERNAL_DATA_THRESHOLD bytes or more
    (and every one already external) to PLACEHOLDER_LOCATION: a model for the checker and shape
    inference, which read dims and types, not data."""
    if is_external(tensor):
        return PLACEHOLDER_LOCATION, 0, tensor_nbytes(tensor)
    if not _movable(tensor):
        return None
    return PLACEHOLDER_LOCATION, 0, tensor_nbytes(tensor)


def without_data(model):
    """copy_without_data with placeholder_place: the model's structure, for shape inference and the checker."""
    return copy_without_data(model, placeholder_place)


def _movable(tensor):
    if tensor.data_type not in _RAW_CONVERTIBLE and not tensor.HasField("raw_data"):
        return False
    return tensor_nbytes(tensor) >= EXTERNAL_DATA_THRESHOLD


def _copy_fields(source, target, skip=()):
    """Copy every field of `source` not named in `skip` to `target`. A skipped field is never read:
    reading a tensor's data (ListFields would) copies it."""
    for descriptor in source.DESCRIPTOR.fields:
        name = descriptor.name
        if name in skip:
            continue
        if _is_repeated(descriptor):
            values = getattr(source, name)
            if len(values):
                getattr(target, name).extend(values)
        elif source.HasField(name):
            if descriptor.message_type is not None:
                getattr(target, name).CopyFrom(getattr(source, name))
            else:
                setattr(target, name, getattr(source, name))


def _is_repeated(descriptor):
    repeated = getattr(descriptor, "is_repeated", None)
    if repeated is not None:
        return repeated
    return descriptor.label == descriptor.LABEL_REPEATED


def _copy_graph(source, target, place):
    _copy_fields(source, target, skip=("initializer", "node"))
    for tensor in source.initializer:
        _copy_tensor(tensor, target.initializer.add(), place)
    for node in source.node:
        _copy_node(node, target.node.add(), place)


def _holds_tensors(attribute):
    return attribute.HasField("t") or attribute.HasField("g") or len(attribute.tensors) or len(attribute.graphs)


def _copy_node(source, target, place):
    if not any(_holds_tensors(attribute) for attribute in source.attribute):
        target.CopyFrom(source)
        return
    _copy_fields(source, target, skip=("attribute",))
    for attribute in source.attribute:
        copy = target.attribute.add()
        # Sparse tensors are copied whole: the checker's full check cannot read their indices from a file.
        _copy_fields(attribute, copy, skip=("t", "tensors", "g", "graphs"))
        if attribute.HasField("t"):
            _copy_tensor(attribute.t, copy.t, place)
        for tensor in attribute.tensors:
            _copy_tensor(tensor, copy.tensors.add(), place)
        if attribute.HasField("g"):
            _copy_graph(attribute.g, copy.g, place)
        for graph in attribute.graphs:
            _copy_graph(graph, copy.graphs.add(), place)


def _copy_sparse(source, target, place):
    # Whole: the checker's full check cannot read a sparse tensor's indices from external data.
    target.CopyFrom(source)


def _copy_tensor(source, target, place):
    where = place(source)
    if where is None:
        target.CopyFrom(source)
        return
    _copy_fields(source, target, skip=_DATA_FIELDS)
    point_to_external_data(target, *where)


def point_to_external_data(tensor, location, offset, length):
    """Make `tensor` (which holds no data) refer to `length` bytes at `offset` in the file `location`."""
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = TensorProto.EXTERNAL


# --------------------------------------------------------------------------------- writing a data file

class DataFileWriter:
    """A `place` for copy_without_data that appends each tensor of EXTERNAL_DATA_THRESHOLD bytes or more
    to an open binary file as it is met (one tensor's bytes in memory at a time), aligned so that
    onnxruntime can map the large ones; `location` is the name the model records."""

    def __init__(self, file, location, held=None):
        self.file = file
        self.location = location
        self.held = held
        self.offset = 0
        self.tensors = 0

    def __call__(self, tensor):
        raw = held_value(tensor, self.held)  # written from the array itself, never copied into the protobuf
        if raw is None:
            if is_external(tensor) or not _movable(tensor):
                return None
            raw = tensor_bytes(tensor)
            if raw is None:
                return None
        size = len(raw) if isinstance(raw, bytes) else raw.nbytes
        alignment = LARGE_TENSOR_ALIGNMENT if size >= LARGE_TENSOR_BYTES else SMALL_TENSOR_ALIGNMENT
        padding = -self.offset % alignment
        if padding:
            self.file.write(b"\0" * padding)
            self.offset += padding
        if is_deferred(raw):
            for block in raw.blocks():  # computed and written a block at a time
                self.file.write(_little_endian(block).reshape(-1).view(np.uint8))
        else:
            self.file.write(raw.reshape(-1).view(np.uint8) if isinstance(raw, np.ndarray) else raw)
        where = (self.location, self.offset, size)
        self.offset += size
        self.tensors += 1
        return where


def tensor_bytes(tensor):
    """The tensor's data in ONNX's raw (little-endian) layout, or None when it must stay inline."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type not in _RAW_CONVERTIBLE:
        return None
    array = numpy_helper.to_array(tensor)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()


# ------------------------------------------------------------------------------ reading external data

def external_references(model, folder, path):
    """[(tensor, resolved data file, offset, length)] for every tensor kept outside the model file.

    Every location is validated here, before anything is read: it must be relative, must not climb with
    "..", and must resolve (symlinks followed) to an existing regular file inside the model's folder.
    """
    real_folder = os.path.realpath(folder)
    references = []
    for tensor in all_tensors(model):
        if not is_external(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = "%s: tensor %r keeps its data at %r" % (path, tensor.name, location)
        if not location:
            raise FoldError("%s: tensor %r is marked as external data but names no location" % (path, tensor.name))
        if not isinstance(location, str) or "\0" in location:
            raise FoldError("%s, which is not a valid file name" % where)
        if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
            raise FoldError("%s, an absolute path; external data must lie in the model's folder "
                            "(path traversal refused)" % where)
        if ".." in location.replace("\\", "/").split("/"):
            raise FoldError("%s, which climbs out with '..'; external data must lie in the model's folder "
                            "(path traversal refused)" % where)
        joined = os.path.join(folder, location)
        resolved = os.path.realpath(joined)
        if os.path.commonpath([resolved, real_folder]) != real_folder:
            raise FoldError("%s, a symlink that points outside the model's folder (to %s): path traversal refused"
                            % (where, resolved))
        if _is_symlink_loop(joined):
            raise FoldError("%s, a symlink loop (it never reaches a file)" % where)
        if not os.path.exists(resolved):
            raise FoldError("%s: the external data file %r of tensor %r is missing" % (path, location, tensor.name))
        if not os.path.isfile(resolved):
            raise FoldError("%s, which is not a regular file" % where)
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise FoldError("%s with an offset or length that is not an integer" % where) from None
        if offset < 0 or (length is not None and length < 0):
            raise FoldError("%s with a negative offset or length" % where)
        references.append((tensor, resolved, offset, length))
    return references


def _is_symlink_loop(path):
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def read_external_bytes(file, offset, length, tensor_name, path):
    """`length` bytes (to the end when None) at `offset` of the data file `file`, checked to be there."""
    try:
        with open(file, "rb") as data_file:
            size = os.fstat(data_file.fileno()).st_size
            end = size if length is None else offset + length
            if offset > size or end > size:
                raise FoldError(
                    "%s: the external data file %s is %d bytes, too short for tensor %r (bytes %d to %d)"
                    % (path, os.path.basename(file), size, tensor_name, offset, end)
                )
            data_file.seek(offset)
            return data_file.read(end - offset)
    except OSError as error:
        raise FoldError("%s: cannot read the external data of tensor %r: %s"
                        % (path, tensor_name, error.strerror or error)) from None


def load_into(references, path):
    """Read each reference's bytes into its tensor, which then holds its data itself."""
    for tensor, file, offset, length in references:
        tensor.raw_data = read_external_bytes(file, offset, length, tensor.name, path)
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]


def refer_in_place(references, path):
    """Leave each referenced tensor's data in its file, recorded by the file's resolved, absolute path
    (which no valid model has: the checker refuses absolute locations, so only foldnorm writes them), once
    the file is known to hold it. read_referenced_array reads such a tensor when the fold needs it;
    load_referenced loads the rest before the model leaves foldnorm."""
    for tensor, file, offset, length in references:
        length = checked_length(file, offset, length, tensor.name, path)
        del tensor.external_data[:]
        point_to_external_data(tensor, file, offset, length)


def checked_length(file, offset, length, tensor_name, path):
    """The byte length of a reference (to the end of the file when `length` is None), once the data file
    is known to hold it; FoldError naming the model file `path` otherwise."""
    try:
        size = os.path.getsize(file)
    except OSError as error:
        raise FoldError("%s: cannot read the external data of tensor %r: %s"
                        % (path, tensor_name, error.strerror or error)) from None
    end = size if length is None else offset + length
    if offset > size or end > size:
        raise FoldError("%s: the external data file %s is %d bytes, too short for tensor %r (bytes %d to %d)"
                        % (path, os.path.basename(file), size, tensor_name, offset, end))
    return end - offset


# A held tensor's location: a NUL character, which no file name can have, then the store's key.
_HELD_PREFIX = "\0foldnorm-held-"


class HeldArrays:
    """Large weights the fold made, held as NumPy arrays, or as deferred arrays computed when read
    (proto.is_deferred), outside the protobuf until the model is saved (DataFileWriter writes them straight
    to the data file, a deferred one a block at a time) or handed out (load_into copies them in). Each
    held tensor points to external data at a location that names its key here; a model's session owns its
    store, and the arrays go with it."""

    def __init__(self):
        self._arrays = {}

    def __len__(self):
        return len(self._arrays)

    def hold(self, tensor, name, array, elem_type):
        """Make the empty TensorProto `tensor` a tensor `name` of `elem_type` whose data is `array` (already
        of that type's NumPy dtype), held here rather than copied into the protobuf."""
        key = "%s%d" % (_HELD_PREFIX, len(self._arrays))
        while key in self._arrays:
            key += "+"
        if not is_deferred(array):
            array = _little_endian(array)
            array.flags.writeable = False
        self._arrays[key] = array
        tensor.name = name
        tensor.data_type = elem_type
        tensor.dims.extend(array.shape)
        point_to_external_data(tensor, key, 0, array.nbytes)
        return tensor

    def value(self, tensor):
        """What is held for `tensor` (an array, or a deferred array computed when read), or None."""
        if not self._arrays or not is_external(tensor):
            return None
        for entry in tensor.external_data:
            if entry.key == "location":
                return self._arrays.get(entry.value)
        return None

    def array(self, tensor):
        """The array held for `tensor` (a deferred one computed now), or None."""
        value = self.value(tensor)
        return value if value is None or isinstance(value, np.ndarray) else np.asarray(value)

    def release(self, tensor):
        """Let go of the array held for `tensor` (the tensor then holds its data, or is dropped)."""
        for entry in tensor.external_data:
            if entry.key == "location":
                self._arrays.pop(entry.value, None)

    def clear(self):
        self._arrays.clear()


def held_array(tensor, held=None):
    """The array `held` (a HeldArrays, or None for none) holds for `tensor`, or None."""
    return None if held is None else held.array(tensor)


def held_value(tensor, held=None):
    """What `held` holds for `tensor` (HeldArrays.value), or None: for a caller that writes it."""
    return None if held is None else held.value(tensor)


def _little_endian(array):
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def is_unloaded(tensor, held=None):
    """Whether the tensor's data is in a file foldnorm has not read (not an array `held` holds)."""
    return is_external(tensor) and held_value(tensor, held) is None


def _referenced(tensor):
    """(absolute file, offset, length) of a tensor refer_in_place left in its file, else None."""
    if not is_external(tensor):
        return None
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not os.path.isabs(location):
        return None
    return location, int(info["offset"]), int(info["length"])


def read_referenced_array(tensor, held=None):
    """The array of a tensor refer_in_place left in its file (read-only, as proto.tensor_to_array gives
    it; mapped from the file for the plain numeric types), or None for any other tensor; the tensor itself
    stays as it is."""
    array = held_array(tensor, held)
    if array is not None:
        return array.astype(array.dtype.newbyteorder("="), copy=False)
    where = _referenced(tensor)
    if where is None:
        return None
    file, offset, length = where
    layout = _RAW_LAYOUT.get(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    if layout is None or count * layout.itemsize != length:
        decoded = TensorProto()  # another layout (bfloat16, 4-bit, float8, ...): onnx decodes it
        _copy_fields(tensor, decoded, skip=_DATA_FIELDS)
        decoded.raw_data = read_external_bytes(file, offset, length, tensor.name, file)
        return tensor_to_array(decoded)
    array = map_external_array(file, offset, count, layout, tensor.name)
    return array.astype(layout.newbyteorder("="), copy=False).reshape(tuple(tensor.dims))


def map_external_array(file, offset, count, dtype, tensor_name):
    """A read-only array of `count` elements of `dtype` mapped from the data file `file` at `offset`: the
    pages come straight from the file as the fold reads them, with no copy (refer_in_place has checked
    that the file holds them)."""
    try:
        return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=(count,))
    except (OSError, ValueError) as error:
        raise FoldError("cannot read the external data of tensor %r from %s: %s"
                        % (tensor_name, file, getattr(error, "strerror", None) or error)) from None


def load_referenced(model, held=None):
    """Load into `model` the data of every tensor refer_in_place left in its file and of every array
    `held` (a HeldArrays) holds, which it then lets go."""
    for tensor in all_tensors(model):
        array = held_array(tensor, held)
        if array is not None:
            data = array.tobytes()
            held.release(tensor)
        else:
            where = _referenced(tensor)
            if where is None:
                continue
            data = read_external_bytes(*where, tensor.name, where[0])
        tensor.raw_data = data
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]
