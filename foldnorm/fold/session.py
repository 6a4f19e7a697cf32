"""One model opened for folding: `ModelSession` owns what it opened and runs fold -> verify -> save.

It reads the model once (its structure parsed and checked, its external data validated and left in its
files until the fold reads a tensor), holds the large weights the fold computes outside the protobuf, as
NumPy arrays or as arrays computed when they are written (io.external_data.HeldArrays), and owns a
scratch folder (io.scratch.Scratch) for what it writes for the verifying process. Verification runs in
a child process (verification.isolated): onnxruntime crashing there becomes VerifierCrashed, not the end
of the caller. `save` writes every output into a hidden folder beside its destination, verifies from
there when asked, and only then moves the files into place: a failure leaves nothing written.
fold_model, inspect_model and the `foldnorm` command are thin over it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import onnx

from .core.driver import fold_in_place, inline_functions_holding_batch_norm
from .errors import FoldError, VerificationError
from .io.external_data import HeldArrays, load_referenced, without_data
from .io.modelio import StagedFiles, check_model, open_model, save_model
from .io.proto import attribute_graphs, graph_statistics
from .io.scratch import Scratch
from .report import FoldReport, count_layers

# IR versions before 4 list every initializer among the graph inputs as well.
INITIALIZERS_ARE_INPUTS_BELOW_IR = 4


class ModelSession:
    """A model opened for folding (a path, read once, or a ModelProto, never modified); a context manager
    whose close() lets go of the held weights and removes the scratch folder.

    Attributes: label (how reports name it), path (None for a ModelProto), data_files (the resolved paths
    of the external data files it uses), report (the FoldReport once folded).
    """

    def __init__(self, model_or_path: onnx.ModelProto | str | os.PathLike, *, argument: str = "model_or_path",
                 verifier=None):
        """`verifier`: a verification.isolated.Verifier started ahead (the session owns it from now on)."""
        self.scratch = Scratch()
        self.held = HeldArrays()
        self._verifier = verifier
        try:
            self._opened = open_model(model_or_path, argument, in_place=True)
        except BaseException:
            if verifier is not None:
                verifier.close()
            raise
        self.label = self._opened.label
        self.path = self._opened.path
        self.data_files = self._opened.data_files
        self._original = None if self._opened.owned else model_or_path
        # What verification needs of a file's original, taken before the fold works on it in place.
        self._structure = without_data(self._opened.model) if self.path is not None else None
        self._folded = None
        self._staged = None
        self.report = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self._verifier is not None:
            self._verifier.close()
            self._verifier = None
        self.held.clear()
        self._folded = None
        if self._staged is not None:
            self._staged.discard()
            self._staged = None
        self.scratch.close()

    # --------------------------------------------------------------------------------------- fold

    def fold(self, *, rewrite_bn: bool = False, fold_through_qdq: bool = False,
             fold_input_initializers: bool = False) -> FoldReport:
        """Fold the model (a file's model in place: one copy in memory); returns the FoldReport."""
        if self._folded is not None:
            raise FoldError("%s is folded already; open a new session to fold it again" % self.label)
        original = self._opened.model
        start = time.perf_counter()
        nodes_before, bytes_before = graph_statistics(original.graph)
        layers = count_layers(original.graph)  # before the fold, which may work on `original` itself
        if self._opened.owned:
            folded = original  # read from the file just now: no one else holds it
        else:
            folded = onnx.ModelProto()
            folded.CopyFrom(original)
        declared = folded.ir_version < INITIALIZERS_ARE_INPUTS_BELOW_IR
        read_before = names_read(folded.graph) if declared else None
        inlined = inline_functions_holding_batch_norm(folded)
        outcomes = fold_in_place(folded, rewrite_bn=rewrite_bn, fold_through_qdq=fold_through_qdq,
                                 fold_input_initializers=fold_input_initializers, held=self.held)
        if declared:
            drop_released_declarations(folded.graph, read_before)
        undeclared = [] if declared or not fold_input_initializers else drop_input_initializers(folded.graph)
        # The data of the tensors the pass left in their files; the weights it made stay held until saved.
        load_referenced(folded)
        seconds = time.perf_counter() - start
        check_model(folded, "the folded model", at_least=self._opened.check.level)
        nodes_after, bytes_after = graph_statistics(folded.graph)
        report = FoldReport(model=self.label, outcomes=outcomes, nodes_before=nodes_before, nodes_after=nodes_after,
                            param_bytes_before=bytes_before, param_bytes_after=bytes_after, fold_seconds=seconds,
                            layers=layers)
        if self._opened.check.note:
            report.notes.append(self._opened.check.note)
        if inlined:
            report.notes.append("inlined the model's local functions %s, which hold BatchNormalization nodes, "
                                "to fold them" % ", ".join(inlined))
        if undeclared:
            report.notes.append("treated the initializers also listed as graph inputs as constants and removed them "
                                "from the inputs (<<fold_input_initializers>>): %s" % ", ".join(undeclared))
        if bytes_after > bytes_before:
            report.notes.append("the parameters grew: a folded weight is stored in full, also where the model "
                                "computed it from a smaller constant (ConstantOfShape, Expand, ...)")
        self._folded, self.report = folded, report
        return report

    def folded_model(self) -> onnx.ModelProto:
        """The folded model holding all its data (the held weights are copied in and let go)."""
        folded = self._require_folded()
        load_referenced(folded, self.held)
        return folded

    def _require_folded(self):
        if self._folded is None:
            raise FoldError("%s has not been folded in this session (call fold first)" % self.label)
        return self._folded

    # ------------------------------------------------------------------------------------- verify

    def start_verifier(self):
        """Start the verifying process now, so that its imports overlap with the fold (verify() starts it
        otherwise)."""
        from .verification.isolated import Verifier

        if self._verifier is None:
            self._verifier = Verifier()

    def verify(self, *, shapes=None, rtol=None, atol=None, seed=0, steps=None, progress=None):
        """Compare the folded model with the original (foldnorm.verify's options) in a child process; the
        VerifyReport is also set on the session's report. steps None: the default for the quantized folds."""
        from .quantized.rules import default_step_tolerance
        from .verification.isolated import write_for_child

        report = self.report
        if report is None:
            raise FoldError("%s has not been folded in this session (call fold first)" % self.label)
        steps = default_step_tolerance(report.outcomes) if steps is None else steps
        folder = self.scratch.folder
        if self.path is not None:
            original = os.fspath(self.path)
        else:
            original = write_for_child(self._original, folder, "original")
        if self._staged is not None:
            folded = self._staged.model
        else:
            folded = write_for_child(self._folded, folder, "folded", self.held)
        self.start_verifier()
        verifier, self._verifier = self._verifier, None  # one request per process
        report.verification = verifier.run(original, folded, label=self.label, folder=folder,
                                           structure=self._structure, progress=progress, shapes=shapes, rtol=rtol,
                                           atol=atol, seed=seed, steps=steps)
        return report.verification

    # --------------------------------------------------------------------------------------- save

    def stage(self, output, *, external_data=None):
        """Write the folded model into a hidden folder beside `output` (with its large tensors in
        "<name>.data" when external_data, by default when the input keeps its data outside); verify() then
        reads it there, and commit() moves it into place. The held weights are let go once written."""
        folded = self._require_folded()
        output = Path(os.fspath(output))
        if external_data is None:
            external_data = bool(self.data_files)
        self._staged = StagedFiles()
        path = self._staged.add(output)
        save_model(folded, path, external_data=external_data, held=self.held, durable=False)
        if path.with_name(path.name + ".data").exists():  # moved into place before the model that names it
            self._staged.add(output.with_name(output.name + ".data"), first=True)
        self._staged.model = os.fspath(path)
        self.held.clear()
        self._folded = None  # it lives in the staged file now
        return self._staged

    def commit(self, extra=()):
        """Write each (path, bytes) of `extra` beside the staged model, then move every staged file into
        place (data file, model, then the extras); returns the paths written. On a failure nothing is left."""
        staged = self._staged
        if staged is None:
            raise FoldError("nothing is staged in this session (call stage first)")
        target = None
        try:
            for target, data in extra:
                with open(staged.add(target), "wb") as file:
                    file.write(data)
            target = None
            written = staged.commit()
        except OSError as error:
            staged.discard()
            where = target if target is not None else error.filename or "the output"
            raise FoldError("cannot write %s: %s" % (where, error.strerror or error)) from None
        finally:
            self._staged = None
        return written


def divergence_error(report, verification):
    """The VerificationError of a folded model whose outputs diverged."""
    diverged = [o.name for o in verification.outputs if not o.passed]
    return VerificationError("the folded model's output %s differs from the original's beyond the tolerance"
                             % ", ".join(repr(name) for name in diverged), report, diverged)


def names_read(graph):
    """Every value name a graph's nodes read (their subgraphs' included) or it outputs."""
    read = {value.name for value in graph.output}
    for node in graph.node:
        read.update(name for name in node.input if name)
        for _, subgraph in attribute_graphs(node):
            read |= names_read(subgraph)
    return read


def drop_released_declarations(graph, read_before):
    """Remove, from a graph of IR version < 4, the initializers the fold stopped reading together with the
    graph inputs that declare them: there a graph input that names an initializer is its declaration,
    not an input a caller feeds. What the model already left unread stays as it was."""
    inputs = {value.name for value in graph.input}
    read_now = names_read(graph)
    released = {tensor.name for tensor in graph.initializer
                if tensor.name in inputs and tensor.name in read_before and tensor.name not in read_now}
    if released:
        _delete_where(graph.initializer, lambda tensor: tensor.name in released)
        _delete_where(graph.input, lambda value: value.name in released)


def drop_input_initializers(graph):
    """Remove from the main graph's inputs every one an initializer also names (fold_input_initializers:
    they are constants now); returns their names."""
    initializers = {tensor.name for tensor in graph.initializer}
    names = [value.name for value in graph.input if value.name in initializers]
    _delete_where(graph.input, lambda value: value.name in initializers)
    return names


def _delete_where(repeated, condition):
    """Delete the elements of a repeated protobuf field for which condition(element) holds, in place
    (the elements kept are not copied)."""
    for position in reversed(range(len(repeated))):
        if condition(repeated[position]):
            del repeated[position]
