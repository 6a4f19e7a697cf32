"""Reading ONNX models safely, checking them once, and writing them atomically.

`load_model` refuses, with one sentence a user can act on (FoldError), everything that is not a model we
can fold: a path that is not a file, bytes that are not ONNX (or a truncated or corrupted protobuf), an
opset outside 7..newest, a model neither the ONNX checker nor onnxruntime accepts, and external data that
is missing or whose location escapes the model's folder (foldnorm.fold.io.external_data validates every
location before a byte is read).

`check_model` is the one set of checks every model goes through, and says how valid the model is: it
passes the checker's full check (strict shape inference), the checker, or only onnxruntime's loader
(the checker rejects, for instance, a graph output with a type but no shape, which onnxruntime runs; such
a model is folded, with a one-line warning). A folded model is checked again and must reach the level
its input reached. Large models are checked without their tensor data: the checker reads a copy of
the model's structure whose tensors point to an empty placeholder file.

`save_model` never leaves a partial file: each file is written to a temporary file in the destination
folder, flushed to disk, then renamed over the destination (os.replace is atomic within a folder). Tensor
data goes to the external data file one tensor at a time, never the whole model copied in memory.
`StagedFiles` writes the command's outputs beside their destinations and renames them into place
together, atomic in the same way without flushing them to disk (its docstring says why).

Anything foldnorm writes elsewhere (a checker's copy, a model onnxruntime must read from a file) lives in a
temporary folder (foldnorm.fold.io.scratch) removed when the step or the model's session ends.
"""
import contextlib
import os
import secrets
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from .paths import model_file_problem
from ..errors import FoldError
from .messages import one_line
from .external_data import (EXTERNAL_DATA_THRESHOLD, PLACEHOLDER_LOCATION, DataFileWriter, all_tensors,
                            checked_length, copy_without_data, data_bytes, external_references, held_array,
                            held_value, is_external, is_unloaded, load_into, refer_in_place, without_data)
from .proto import default_opset, tensor_nbytes
from .scratch import temporary_folder
from .wire import unreadable_model_message

MIN_OPSET = 7
# protobuf cannot serialize a message of 2 GiB or more: such a model must keep its tensors outside.
PROTOBUF_LIMIT = 2**31 - 1
# Up to this many bytes of tensor data the checker reads the model itself; past it, its structure only.
IN_MEMORY_CHECK_BYTES = 16 * 2**20
# How messages and reports name a model given as a ModelProto.
IN_MEMORY_LABEL = "<in-memory model>"
# How valid a model is, from least to most: see check_model.
LEVELS = ("onnxruntime", "checker", "full")


@dataclass(frozen=True)
class ModelCheck:
    """What check_model found: the ai.onnx opset (None when the model imports none); the level, one of
    LEVELS ("full": the ONNX checker's full check passes; "checker": its basic check passes; "onnxruntime":
    the checker rejects the model and onnxruntime loads it); and for that last level, the one-line note
    that says so."""

    opset: object
    level: str
    note: str = ""


@dataclass(frozen=True)
class OpenedModel:
    """A model argument made ready: the ModelProto, how reports name it, its check, whether it was read
    from a file here (then nobody else holds it, and the fold may work on it in place), and for a file,
    its path and the resolved paths of the external data files it uses."""

    model: onnx.ModelProto
    label: str
    check: ModelCheck
    owned: bool
    path: "Path | None" = None
    data_files: frozenset = frozenset()


# ------------------------------------------------------------------------------------------- reading

def load_model(path: "str | os.PathLike") -> onnx.ModelProto:
    """Read, check and return the model at `path`, with its external data loaded into the tensors."""
    return _read(path).model


def _read(path, *, in_place=False):
    """The OpenedModel of the file at `path`; in_place: its external data stays in its files until read
    (external_data.refer_in_place), for a caller that loads what is left (load_referenced) before the
    model leaves foldnorm."""
    path, model, references, check = _read_unloaded(path)
    (refer_in_place if in_place else load_into)(references, path)
    return OpenedModel(model, str(path), check, owned=True, path=path, data_files=_data_files(references))


def _data_files(references):
    return frozenset(str(file) for _, file, _, _ in references)


def read_structure(path: "str | os.PathLike", *, load_below: int = EXTERNAL_DATA_THRESHOLD):
    """The model at `path` read and checked as load_model reads it, but of its external data only the
    tensors of fewer than `load_below` bytes read: for a caller that hands the file itself to onnxruntime,
    which reads the rest. Every location has been validated and every data file is known to hold its
    tensor's bytes. Returns (OpenedModel, the references not read: [(tensor, file, offset, length)], which
    external_data.load_into reads into their tensors)."""
    path, model, references, check = _read_unloaded(path)
    unread = []
    for tensor, file, offset, length in references:
        length = checked_length(file, offset, length, tensor.name, path)
        if tensor_nbytes(tensor) >= load_below:
            unread.append((tensor, file, offset, length))
        else:
            load_into([(tensor, file, offset, length)], path)
    return OpenedModel(model, str(path), check, owned=True, path=path, data_files=_data_files(references)), unread


def _read_unloaded(path):
    """(path, model, its external references, its ModelCheck): the file parsed and checked, every
    external data location validated, no external data read."""
    path = Path(os.fspath(path))
    model = onnx.ModelProto()
    _parse(model, _read_model_file(path), path)
    if not model.HasField("graph") or model.ir_version <= 0:
        missing = "graph" if not model.HasField("graph") else "IR version"
        raise FoldError("%s is not an ONNX model (it has no %s)" % (path, missing))
    references = external_references(model, path.absolute().parent, path)
    # Checked before its data is read: the checks need the structure only, and the file as it is.
    return path, model, references, check_model(model, str(path), file=path)


def open_model(model_or_path, name, *, in_place=False):
    """An OpenedModel for an argument that is a ModelProto (checked here) or a path (read and checked as
    load_model does; with in_place, its external data is left in its files: see _read)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return OpenedModel(model_or_path, IN_MEMORY_LABEL, check_model(model_or_path, "the model"), owned=False)
    if isinstance(model_or_path, (str, os.PathLike)):
        return _read(model_or_path, in_place=in_place)
    raise TypeError("%s must be an onnx.ModelProto or a path, got %s" % (name, type(model_or_path).__name__))


def uses_external_data(model_or_path):
    """Whether a model keeps tensors in external files.

    For a path: whether the file names external data (the file is parsed, no tensor data read). For a
    ModelProto: whether any tensor still points to external data (load_model's models have theirs loaded:
    ask with the path).
    """
    if isinstance(model_or_path, onnx.ModelProto):
        return any(is_external(t) for t in all_tensors(model_or_path))
    return bool(external_data_files(model_or_path))


def external_data_files(path):
    """The resolved paths of the external data files the model at `path` uses (an empty set for none). A
    model's session knows them from its one read (OpenedModel.data_files); this reads the file's structure."""
    path = Path(os.fspath(path))
    model = onnx.ModelProto()
    _parse(model, _read_model_file(path), path)
    return set(_data_files(external_references(model, path.absolute().parent, path)))


def _parse(model, data, path):
    try:
        model.ParseFromString(data)
    except Exception as error:
        raise FoldError(unreadable_model_message(path, data, error)) from None


def _read_model_file(path):
    problem = model_file_problem(path)
    if problem is not None:
        raise FoldError(problem)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FoldError("cannot read %s: %s" % (path, error.strerror or error)) from None
    if not data:
        raise FoldError("%s is empty, not an ONNX model" % path)
    return data


# ------------------------------------------------------------------------------------------ checking

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


def check_model(model: onnx.ModelProto, label: str = "the model", *, file: "str | os.PathLike | None" = None,
                at_least: "str | None" = None) -> ModelCheck:
    """The one set of checks every model foldnorm reads or writes goes through.

    The opset must be 7 .. the newest onnx knows. Then the ONNX checker: its full check (strict shape
    inference), else its basic check; a model both reject is accepted when onnxruntime loads it, with a
    one-line warning, and refused otherwise.

    Parameters
    ----------
    model : onnx.ModelProto
        The model; large ones are checked through a copy of their structure alone.
    label : str
        How messages name the model.
    file : path, optional
        The file `model` was parsed from, its external data not loaded (onnxruntime then reads the file).
    at_least : str, optional
        A level of LEVELS the model must reach (for a folded model, the level of its input); no warning
        is issued then.

    Returns
    -------
    ModelCheck
        The opset, the level reached and, for the "onnxruntime" level, the note (also issued as a
        UserWarning when at_least is None).

    Raises
    ------
    FoldError
        The opset is out of range, neither the checker nor onnxruntime accepts the model, or it does not
        reach `at_least`.
    """
    if at_least is not None and at_least not in LEVELS:
        raise ValueError("at_least must be one of %s or None, got %r" % (", ".join(LEVELS), at_least))
    opset = check_opset(model, label)
    with contextlib.ExitStack() as stack:
        structure = _checkable(model, stack)
        full_error = _checker_error(structure, full=True)
        if full_error is None:
            return ModelCheck(opset, "full")
        if at_least == "full":
            raise FoldError("%s fails the ONNX checker's full check, which the original model passes: %s"
                            % (label, full_error))
        error = _checker_error(structure, full=False)
    if error is None:
        return ModelCheck(opset, "checker")
    if at_least == "checker":
        raise FoldError("%s fails the ONNX checker, which the original model passes: %s" % (label, error))
    runtime_error = _onnxruntime_error(model, file)
    if runtime_error is not None:
        raise FoldError("%s is not a valid ONNX model; the ONNX checker rejects it: %s (and onnxruntime cannot "
                        "load it: %s)" % (label, error, runtime_error))
    note = "the ONNX checker rejects %s (%s); onnxruntime loads it, so foldnorm accepts it" % (label, error)
    if at_least is None:
        warnings.warn("foldnorm: " + note, UserWarning, stacklevel=2)
    return ModelCheck(opset, "onnxruntime", note)


def _checkable(model, stack):
    """What the checker reads: the model itself when it is small and holds its data, else the path of a
    copy of its structure (tensors pointing to an empty placeholder file) in a temporary folder."""
    if data_bytes(model) < IN_MEMORY_CHECK_BYTES and not any(is_external(t) for t in all_tensors(model)):
        return model
    folder = stack.enter_context(temporary_folder())
    path = os.path.join(folder, "model.onnx")
    with open(path, "wb") as file:
        file.write(without_data(model).SerializeToString())
    open(os.path.join(folder, PLACEHOLDER_LOCATION), "wb").close()
    return path


def _checker_error(structure, *, full):
    try:
        onnx.checker.check_model(structure, full_check=full)
    except Exception as error:  # noqa: BLE001 - the checker raises several types; each is a finding
        return one_line(error)
    return None


def _onnxruntime_error(model, file):
    """None when onnxruntime (CPU, optimizations off) creates a session for the model, else its reason."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        with temporary_folder() as folder:
            source = os.fspath(file) if file is not None else onnxruntime_source(model, folder)
            ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
        return one_line(error)
    return None


# ------------------------------------------------------------------------------------------- writing

def save_model(model: onnx.ModelProto, path: "str | os.PathLike", *, external_data: bool = False,
               held=None, durable: bool = True) -> list:
    """Write `model` to `path` atomically, with its large tensors in "<file name>.data" when asked.

    External data is also used, whatever `external_data` says, when the model would serialize to 2 GiB
    or more. `model` itself is never changed, and never copied whole: tensor data is written one tensor
    at a time. On any failure nothing new is left behind: the temporary files are removed and an existing
    file at `path` is untouched. `held`: the HeldArrays whose arrays some tensors point to (written
    straight from the arrays). durable=False skips flushing the files to disk (for files StagedFiles
    moves into place, or that are thrown away). Returns the paths written.
    """
    path = Path(os.fspath(path))
    folder = path.absolute().parent
    if not folder.is_dir():
        raise FoldError("cannot write %s: the folder %s does not exist" % (path, folder))
    if path.is_dir():
        raise FoldError("cannot write %s: it is a directory" % path)
    for tensor in all_tensors(model):
        if is_unloaded(tensor, held):
            raise FoldError("cannot write the model: tensor %r still points to external data that was never loaded"
                            % tensor.name)

    serialized = None if external_data else _serialized_within_limit(_with_held_data(model, held))
    if serialized is not None:
        _write_atomically(path, lambda file: file.write(serialized), durable)
        return [path]

    data_name = path.name + ".data"
    data_path = folder / data_name
    writer = skeleton = None

    def write_data(file):
        nonlocal writer, skeleton
        writer = DataFileWriter(file, data_name, held)
        skeleton = copy_without_data(model, writer)

    # The data file goes first, so a model file only ever appears next to the data it describes; a data
    # file it replaces is kept (hard-linked) until the model is in place, to be put back if that fails.
    data_temp = _write_temporary(data_path, write_data, durable)
    if not writer.tensors:
        _remove_quietly(data_temp)
        _write_atomically(path, lambda file: file.write(skeleton.SerializeToString()), durable)
        return [path]
    try:
        model_temp = _write_temporary(path, lambda file: file.write(skeleton.SerializeToString()), durable)
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


def onnxruntime_source(model: onnx.ModelProto, folder: "str | os.PathLike") -> "bytes | str":
    """What onnxruntime should load for `model`: its serialized bytes, or, past protobuf's 2 GiB limit,
    the path of a copy written by save_model into `folder` with external data (the model is not changed)."""
    for tensor in all_tensors(model):
        if is_unloaded(tensor):
            raise FoldError("tensor %r keeps its data in an external file that was not loaded" % tensor.name)
    serialized = _serialized_within_limit(model)
    if serialized is not None:
        return serialized
    path = os.path.join(os.fspath(folder), "model.onnx")
    save_model(model, path, external_data=True)
    return path


def _with_held_data(model, held):
    """`model`, or when some of its tensors are arrays `held` holds, a copy holding their data."""
    if not held or not any(held_value(t, held) is not None for t in all_tensors(model)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in all_tensors(copy):
        array = held_array(tensor, held)
        if array is not None:
            tensor.raw_data = array.tobytes()
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return copy


def _serialized_within_limit(model):
    """The model's bytes, or None past protobuf's limit (judged from its tensors first: asking protobuf
    for a message's size costs as much as serializing it)."""
    if data_bytes(model) >= PROTOBUF_LIMIT:
        return None
    try:
        serialized = model.SerializeToString()
    except ValueError:  # the rest of the model took it past the limit
        return None
    return serialized if len(serialized) < PROTOBUF_LIMIT else None


def _write_atomically(path, write, durable=True):
    temp = _write_temporary(path, write, durable)
    try:
        _replace(temp, path, durable)
    except BaseException:
        _remove_quietly(temp)
        raise


def _write_temporary(path, write, durable=True):
    """Call write(file) on a new temporary file beside `path`, then (durable) flush it to disk; returns its
    path."""
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
            write(file)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        if mode is not None:
            os.chmod(temp, mode)
    except BaseException as error:
        _remove_quietly(temp)
        if isinstance(error, OSError):
            raise FoldError("cannot write %s: %s" % (path, error.strerror or error)) from None
        raise
    return temp


def _replace(temp, path, durable=True):
    try:
        os.replace(temp, path)
    except OSError as error:
        raise FoldError("cannot write %s: %s" % (path, error.strerror or error)) from None
    if durable:
        _fsync_folder(path.absolute().parent)


class StagedFiles:
    """Files written into a hidden folder beside each destination, then moved into place together.

    add(destination) returns where to write a file; commit() moves them into place in the order added (a
    model's data file before the model, the report last), and on any failure puts back what it replaced
    and removes what it moved; discard() removes everything staged.

    Each file is complete before it is renamed into place, so a crash or kill of foldnorm at any moment
    leaves the previous file or the new one, never part of one. The files are not forced to disk (no
    fsync, as onnx.save_model and onnxruntime's optimizer do not): that guards against a power failure in
    the seconds after the command, and flushing hundreds of megabytes made the command wait on the disk.
    After such a failure the file system decides what remains (ext4, for one, flushes a file renamed over
    an existing one).
    """

    def __init__(self):
        self._folders = {}
        self._files = []
        self._added = []
        self.model = None

    def add(self, destination, *, first=False):
        """Where to write the file that goes to `destination` (moved into place before the others when
        `first`)."""
        destination = Path(os.fspath(destination))
        folder = destination.absolute().parent
        hidden = self._folders.get(folder)
        if hidden is None:
            try:
                hidden = self._folders[folder] = Path(tempfile.mkdtemp(prefix=".foldnorm-", dir=folder))
            except OSError as error:
                raise FoldError("cannot write %s: %s" % (destination, error.strerror or error)) from None
        staged = hidden / destination.name
        self._files.insert(0 if first else len(self._files), (staged, destination))
        self._added.append(destination)
        return staged

    def commit(self):
        """Move every staged file into place; returns the destinations, in the order they were added."""
        moved = []
        try:
            for staged, destination in self._files:
                backup = _hard_link_backup(destination)
                try:
                    os.replace(staged, destination)
                except BaseException:
                    if backup is not None:
                        _remove_quietly(backup)
                    raise
                moved.append((destination, backup))
        except BaseException:
            for destination, backup in reversed(moved):
                if backup is not None:
                    os.replace(backup, destination)
                else:
                    _remove_quietly(destination)
            self.discard()
            raise
        for _, backup in moved:
            if backup is not None:
                _remove_quietly(backup)
        self.discard()
        return list(self._added)

    def discard(self):
        for hidden in self._folders.values():
            shutil.rmtree(hidden, ignore_errors=True)
        self._folders = {}


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


__all__ = ["load_model", "read_structure", "save_model", "StagedFiles", "onnxruntime_source", "check_model", "check_opset",
           "open_model",
           "ModelCheck", "OpenedModel", "LEVELS", "uses_external_data", "external_data_files",
           "all_tensors", "temporary_folder", "PROTOBUF_LIMIT"]
