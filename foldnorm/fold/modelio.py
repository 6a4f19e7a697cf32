"""Reading ONNX models safely and writing them atomically.

`load_model` refuses, with one sentence a user can act on (FoldError), everything that is not a model we
can fold: a path that is not a file, bytes that are not ONNX (or a truncated or corrupted protobuf), a
model onnx.checker rejects, an opset outside 7..newest, and external data that is missing or whose
location escapes the model's folder (an absolute location, "..", a symlink pointing outside). The
external-data locations are all checked before a single byte of external data is read: a model file is
untrusted input, and a location is a path it asks us to open.

`save_model` never leaves a partial file: each file is written to a temporary file in the destination
folder, flushed to disk, then renamed over the destination (os.replace is atomic within a folder).
"""
import errno
import os
import secrets
from pathlib import Path

import onnx
from onnx import numpy_helper

from .errors import FoldError
from .messages import one_line
from .proto import default_opset
from .wire import unreadable_model_message

MIN_OPSET = 7
# protobuf cannot serialize a message of 2 GiB or more: such a model must keep its tensors outside.
PROTOBUF_LIMIT = 2**31 - 1
# Tensors smaller than this stay inside the model file when writing external data (onnx's own default).
EXTERNAL_DATA_THRESHOLD = 1024
_EXTERNAL_DATA_ALIGNMENT = 64

# realpath of each model file load_model read -> realpaths of the external data files it used.
_external_data_of_loaded = {}


def load_model(path):
    """Read, check and return the model at `path`, with its external data loaded into the tensors."""
    path = Path(os.fspath(path))
    data = _read_model_file(path)
    model = onnx.ModelProto()
    _parse(model, data, path)
    if not model.HasField("graph") or model.ir_version <= 0:
        missing = "graph" if not model.HasField("graph") else "IR version"
        raise FoldError("%s is not an ONNX model (it has no %s)" % (path, missing))

    folder = path.absolute().parent
    references = _external_references(model, folder, path)
    for tensor, file, offset, length in references:
        tensor.raw_data = _read_external_bytes(file, offset, length, tensor.name, path)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    _external_data_of_loaded[os.path.realpath(path)] = frozenset(str(file) for _, file, _, _ in references)

    check_model(model, str(path), path)
    return model


def uses_external_data(model_or_path):
    """Whether a model keeps tensors in external files.

    For a path: what load_model found when it read that file (the file is read again, without its
    external data, when load_model has not). For a ModelProto: whether any tensor still points to external
    data (load_model's models have theirs loaded: ask with the path).
    """
    if isinstance(model_or_path, onnx.ModelProto):
        return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model_or_path))
    return bool(external_data_files(model_or_path))


def external_data_files(path):
    """The resolved paths of the external data files the model at `path` uses (an empty set for none)."""
    key = os.path.realpath(os.fspath(path))
    if key not in _external_data_of_loaded:
        path = Path(os.fspath(path))
        model = onnx.ModelProto()
        _parse(model, _read_model_file(path), path)
        references = _external_references(model, path.absolute().parent, path)
        _external_data_of_loaded[key] = frozenset(str(file) for _, file, _, _ in references)
    return set(_external_data_of_loaded[key])


def save_model(model, path, *, external_data=False):
    """Write `model` to `path` atomically, with its large tensors in "<file name>.data" when asked.

    External data is also used, whatever `external_data` says, when the model would serialize to 2 GiB
    or more. `model` itself is never changed. On any failure nothing new is left behind: the temporary
    files are removed and an existing file at `path` is untouched. Returns the paths written.
    """
    path = Path(os.fspath(path))
    folder = path.absolute().parent
    if not folder.is_dir():
        raise FoldError("cannot write %s: the folder %s does not exist" % (path, folder))
    if path.is_dir():
        raise FoldError("cannot write %s: it is a directory" % path)
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise FoldError("cannot write the model: tensor %r still points to external data that was never loaded"
                            % tensor.name)

    if not external_data and _serialized_size(model) < PROTOBUF_LIMIT:
        _write_atomically(path, [model.SerializeToString()])
        return [path]

    data_name = path.name + ".data"
    outside = onnx.ModelProto()
    outside.CopyFrom(model)
    chunks, offset = [], 0
    for tensor in all_tensors(outside):
        raw = _tensor_bytes(tensor)
        if raw is None or len(raw) < EXTERNAL_DATA_THRESHOLD:
            continue
        padding = -offset % _EXTERNAL_DATA_ALIGNMENT
        chunks.append(b"\0" * padding)
        offset += padding
        chunks.append(raw)
        _point_to_external_data(tensor, data_name, offset, len(raw))
        offset += len(raw)
    if not chunks:
        _write_atomically(path, [outside.SerializeToString()])
        return [path]
    # The data file goes first, so a model file only ever appears next to the data it describes; a data
    # file it replaces is kept (hard-linked) until the model is in place, to be put back if that fails.
    data_path = folder / data_name
    data_temp = _write_temporary(data_path, chunks)
    try:
        model_temp = _write_temporary(path, [outside.SerializeToString()])
    except BaseException:
        _remove_quietly(data_temp)
        raise
    backup = _hard_link_backup(data_path)
    try:
        _replace(data_temp, data_path)
    except BaseException:
        for temp in (data_temp, model_temp, backup):
            if temp is not None:
                _remove_quietly(temp)
        raise
    try:
        _replace(model_temp, path)
    except BaseException:
        _remove_quietly(model_temp)
        if backup is not None:
            os.replace(backup, data_path)
        else:
            _remove_quietly(data_path)
        raise
    if backup is not None:
        _remove_quietly(backup)
    return [path, data_path]


def write_file_atomically(path, data):
    """Write bytes to `path` the way save_model writes a model: a temporary file, fsync, os.replace."""
    path = Path(os.fspath(path))
    if not path.absolute().parent.is_dir():
        raise FoldError("cannot write %s: the folder %s does not exist" % (path, path.absolute().parent))
    if path.is_dir():
        raise FoldError("cannot write %s: it is a directory" % path)
    _write_atomically(path, [data])


def check_opset(model, label="the model"):
    """The model's ai.onnx opset (None when it imports none); FoldError outside 7 .. the newest onnx knows."""
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset < MIN_OPSET:
        raise FoldError("%s uses ai.onnx opset %d; foldnorm supports opsets %d to %d (convert it first, e.g. "
                        "with onnx.version_converter)" % (label, opset, MIN_OPSET, newest))
    if opset is not None and opset > newest:
        raise FoldError("%s uses ai.onnx opset %d, newer than the installed onnx knows (%d); upgrade onnx"
                        % (label, opset, newest))
    return opset


def check_model(model, label="the model", path=None):
    """The one set of checks every model foldnorm reads goes through: its opset, then onnx.checker (on the
    file at `path` when the model is too large to serialize). Returns the ai.onnx opset."""
    opset = check_opset(model, label)
    try:
        if _serialized_size(model) < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        elif path is not None:
            onnx.checker.check_model(str(path))
    except Exception as error:
        raise FoldError("%s is not a valid ONNX model; the ONNX checker rejects it: %s"
                        % (label, one_line(error))) from None
    return opset


def as_model(model_or_path, name, *, check=True):
    """(ModelProto, label) for an argument that is a ModelProto (checked here unless check=False: a model
    foldnorm made itself) or a path (read and checked by load_model)."""
    if isinstance(model_or_path, onnx.ModelProto):
        if check:
            check_model(model_or_path, "the model")
        return model_or_path, "<in-memory model>"
    if isinstance(model_or_path, (str, os.PathLike)):
        return load_model(model_or_path), str(model_or_path)
    raise TypeError("%s must be an onnx.ModelProto or a path, got %s" % (name, type(model_or_path).__name__))


def _parse(model, data, path):
    try:
        model.ParseFromString(data)
    except Exception as error:
        raise FoldError(unreadable_model_message(path, data, error)) from None


def _read_model_file(path):
    if not path.exists():
        raise FoldError("%s: no such file" % path)
    if path.is_dir():
        raise FoldError("%s is a directory, not an ONNX model file" % path)
    if not path.is_file():
        raise FoldError("%s is not a regular file" % path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FoldError("cannot read %s: %s" % (path, error.strerror or error)) from None
    if not data:
        raise FoldError("%s is empty, not an ONNX model" % path)
    return data


def _external_references(model, folder, path):
    """[(tensor, resolved data file, offset, length)] for every tensor kept outside the model file.

    Every location is validated here, before anything is read: it must be relative, must not climb with
    "..", and must resolve (symlinks followed) to an existing regular file inside the model's folder.
    """
    real_folder = os.path.realpath(folder)
    references = []
    for tensor in all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = "%s: tensor %r keeps its data at %r" % (path, tensor.name, location)
        if not location:
            raise FoldError("%s: tensor %r is marked as external data but names no location" % (path, tensor.name))
        if "\0" in location:
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


def _read_external_bytes(file, offset, length, tensor_name, path):
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
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for subgraph in attribute.graphs:
            yield from _graph_tensors(subgraph)


_RAW_CONVERTIBLE = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}


def _tensor_bytes(tensor):
    """The tensor's data in ONNX's raw (little-endian) layout, or None when it must stay inline."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type not in _RAW_CONVERTIBLE:
        return None
    array = numpy_helper.to_array(tensor)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()


def _point_to_external_data(tensor, location, offset, length):
    for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _serialized_size(model):
    try:
        return model.ByteSize()
    except Exception:
        # A message past protobuf's limit may not even report its size: count its tensor bytes instead.
        return sum(len(t.raw_data) for t in all_tensors(model))


def _write_atomically(path, chunks):
    temp = _write_temporary(path, chunks)
    try:
        _replace(temp, path)
    except BaseException:
        _remove_quietly(temp)
        raise


def _write_temporary(path, chunks):
    """Write `chunks` to a new temporary file beside `path`, flushed to disk; returns its path."""
    folder = path.absolute().parent
    mode = _existing_mode(path)
    temp = folder / (".%s.%s.tmp" % (path.name, secrets.token_hex(6)))
    try:
        # 0o666 lets the umask decide, as for any new file; an existing file's mode is kept below.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise FoldError("cannot write %s: %s" % (path, error.strerror or error)) from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:
            os.chmod(temp, mode)
    except BaseException as error:
        _remove_quietly(temp)
        if isinstance(error, OSError):
            raise FoldError("cannot write %s: %s" % (path, error.strerror or error)) from None
        raise
    return temp


def _replace(temp, path):
    try:
        os.replace(temp, path)
    except OSError as error:
        raise FoldError("cannot write %s: %s" % (path, error.strerror or error)) from None
    _fsync_folder(path.absolute().parent)


def _hard_link_backup(path):
    """A second name for an existing file (None when there is none, or links are not supported)."""
    if not path.is_file():
        return None
    backup = path.absolute().parent / (".%s.%s.old" % (path.name, secrets.token_hex(6)))
    try:
        os.link(path, backup)
    except OSError:
        return None
    return backup


def _existing_mode(path):
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return None


def _fsync_folder(folder):
    """Make the rename itself durable; some platforms cannot open a folder, which is harmless there."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["load_model", "save_model", "uses_external_data", "external_data_files", "check_opset",
           "write_file_atomically", "all_tensors", "PROTOBUF_LIMIT"]
