"""Verification in a process of its own, so that onnxruntime crashing cannot take the caller down:
`verify` (public as foldnorm.verify) and the model session's verification both run through `Verifier`.

`Verifier` starts `python -m foldnorm.fold.verification.isolated`, which imports onnx and onnxruntime while
the caller folds, then reads from its stdin the paths of the pickled request (the two models as files,
the original's structure, verify()'s options) and of the result, runs `verify` and pickles its
VerifyReport, or the FoldError it raised, into the result. Progress sentences reach the parent on the
child's stderr, one per line after a marker; anything else onnxruntime prints there is kept for the message
of a crash. A child that dies by a signal (onnxruntime's segmentation fault, the kernel's out-of-memory
killer) or exits without a result becomes VerifierCrashed, which names the model and the signal. Both
files live in the caller's scratch folder, which no other user can read.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from typing import Callable

from ..errors import VerifierCrashed
from ..io.scratch import Scratch

PROGRESS_MARKER = "\0foldnorm-progress "
# Tensor data past which a model given in memory goes to the verifying process with its large tensors in a
# data file.
EXTERNAL_DATA_BYTES = 64 * 2**20
# How many of the child's other stderr lines a crash message may quote.
KEPT_LINES = 5


class Verifier:
    """A verifying process, started ahead of the request so that its imports (onnx, onnxruntime: about a
    second) overlap with the caller's fold; run() hands it one request and waits for the result."""

    def __init__(self):
        self._child = subprocess.Popen(
            [sys.executable, "-m", "foldnorm.fold.verification.isolated"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_child_environment())
        self._noise = []
        self._progress = None
        self._reader = threading.Thread(target=_read_stderr, args=(self._child.stderr, self, self._noise),
                                        daemon=True)
        self._reader.start()

    def say(self, message):
        if self._progress is not None:
            self._progress(message)

    def run(self, original, folded, *, label, folder, structure=None, progress=None, **options):
        """verify(original, folded, **options) in the process; `original` and `folded` are paths,
        `structure` the original's structure when its session has read it already (io.external_data.
        without_data: the child then does not read the file again, onnxruntime does), `label` how a crash
        names the model, `folder` where the request and the result are written. Returns the VerifyReport;
        raises what verify raised, or VerifierCrashed."""
        request = os.path.join(folder, "verify-request.pickle")
        result = os.path.join(folder, "verify-result.pickle")
        structure = None if structure is None else structure.SerializeToString()
        with open(request, "wb") as file:
            pickle.dump((original, structure, folded, options), file, protocol=pickle.HIGHEST_PROTOCOL)
        self._progress = progress
        try:
            try:
                self._child.stdin.write(("%s\n%s\n" % (request, result)).encode())
                self._child.stdin.close()
            except OSError:
                pass  # the process died already: its exit status says how
            returncode = self._child.wait()
        finally:
            self.close()
            os.unlink(request)
        if returncode < 0:
            raise VerifierCrashed(label, signal=_signal_name(-returncode))
        try:
            with open(result, "rb") as file:
                status, value = pickle.load(file)
        except (OSError, EOFError, pickle.UnpicklingError):
            detail = ": %s" % self._noise[-1] if self._noise else ""
            raise VerifierCrashed(label, exit_code=returncode, detail=detail) from None
        finally:
            if os.path.exists(result):
                os.unlink(result)
        if status == "error":
            raise value
        return value

    def close(self):
        """End the process if it is still running (a caller interrupted, or one that never asked); closing
        twice is harmless."""
        if self._child.stderr.closed:
            return
        if self._child.poll() is None:
            self._child.kill()
            self._child.wait()
        self._reader.join()
        self._child.stderr.close()
        if not self._child.stdin.closed:
            try:
                self._child.stdin.close()
            except OSError:
                pass


def verify(original, folded, *, shapes: dict[str, list[int]] | None = None, rtol: float | None = None,
           atol: float | None = None, seed: int = 0, progress: Callable[[str], None] | None = None,
           steps: float | None = None):
    """Run `original` and `folded` in onnxruntime on the same seeded inputs and compare every output, in a
    process of its own: onnxruntime crashing there raises VerifierCrashed instead of ending the caller.

    Parameters
    ----------
    original, folded : onnx.ModelProto or path
        The model before and after folding. A path is read as foldnorm.load_model reads it (checked, its
        external data locations validated), but its large tensors are left for onnxruntime to read; a
        ModelProto is written to a temporary folder for the verifying process (its large tensors in a data
        file).
    shapes : dict, optional
        {input name: [dims]} for inputs whose dynamic dims should not be chosen by verification.
    rtol, atol : float, optional
        Tolerances replacing the defaults (foldnorm.fold.verification.tolerance).
    seed : int
        Seed of the random inputs.
    progress : callable, optional
        Called with a short sentence as each step starts (the command line shows them).
    steps : float, optional
        The tolerance of an output written by QuantizeLinear (-> DequantizeLinear), which is compared in its
        quantization steps instead (1 when None; foldnorm.fold.quantized.steps).

    Returns
    -------
    VerifyReport
        A mismatch never raises: the caller decides what to do with it (verification.runner.verify, which
        this runs, says how the models are run and compared).

    Raises
    ------
    FoldError
        The original cannot be run: an input whose shape is unknown and not given, an input type
        verification cannot generate, inputs over the byte limit, a model onnxruntime refuses, or no
        candidate shape at which onnxruntime runs it.
    VerifierCrashed
        The verifying process died (onnxruntime's segmentation fault, the out-of-memory killer): the
        exception names the original model and the signal.
    """
    import onnx

    from ..io.modelio import IN_MEMORY_LABEL
    from .runner import check_options

    models = {"original": original, "folded": folded}
    for name, model in models.items():
        if not isinstance(model, (onnx.ModelProto, str, os.PathLike)):
            raise TypeError("%s must be an onnx.ModelProto or a path, got %s" % (name, type(model).__name__))
    options = check_options(shapes=shapes, rtol=rtol, atol=atol, seed=seed, steps=steps)
    verifier = Verifier()  # its imports overlap with the writing of the models given in memory
    try:
        with Scratch() as scratch:
            paths = [os.fspath(model) if isinstance(model, (str, os.PathLike))
                     else write_for_child(model, scratch.folder, name) for name, model in models.items()]
            label = paths[0] if isinstance(original, (str, os.PathLike)) else IN_MEMORY_LABEL
            return verifier.run(*paths, label=label, folder=scratch.folder, progress=progress, **options)
    finally:
        verifier.close()


def write_for_child(model, folder, name, held=None):
    """The path of `model` written for the verifying process into a new folder `name` under `folder`, its
    large tensors (those `held` holds among them) in a data file beside it."""
    from ..io.external_data import data_bytes
    from ..io.modelio import save_model

    folder = os.path.join(folder, name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    large = data_bytes(model) > EXTERNAL_DATA_BYTES or (held is not None and len(held) > 0)
    save_model(model, path, external_data=large, held=held, durable=False)
    return path


def _child_environment():
    """The caller's environment, with foldnorm importable from where this process imports it."""
    environment = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    paths = [root] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def _read_stderr(stream, verifier, noise):
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith(PROGRESS_MARKER):
            verifier.say(line[len(PROGRESS_MARKER):])
        elif line.strip():
            noise.append(line.strip())
            del noise[:-KEPT_LINES]


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


def _child():
    """The child's work: import what verification needs, wait for the request's and the result's paths on
    stdin, run verify on the request and pickle what came of it."""
    import onnx

    from ..errors import FoldError
    from .runner import quiet_onnxruntime, verify
    from .sessions import ModelSource

    quiet_onnxruntime()  # imports onnxruntime, before the request comes
    request, result = sys.stdin.readline().strip(), sys.stdin.readline().strip()
    if not request:
        return  # the caller did not need it after all
    with open(request, "rb") as file:
        original, structure, folded, options = pickle.load(file)

    def say(message):
        sys.stderr.write(PROGRESS_MARKER + message.replace("\n", " ") + "\n")
        sys.stderr.flush()

    try:
        if structure is not None:
            original = ModelSource.of_structure(onnx.ModelProto.FromString(structure), original)
        outcome = ("report", verify(original, folded, progress=say, **options))
    except FoldError as error:
        outcome = ("error", error)
    with open(result, "wb") as file:
        pickle.dump(outcome, file, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    _child()
