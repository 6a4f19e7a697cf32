"""The `foldnorm` command: fold, inspect, demo.

    foldnorm fold MODEL.onnx [-o OUT.onnx] [--report REPORT.json] [--rewrite-bn] [--no-verify]
                  [--shape NAME=1,3,224,224 ...] [--rtol R] [--atol A] [--force] [-q | -v]
                  [--fold-through-qdq] [--fold-input-initializers] [--steps N]
    foldnorm inspect MODEL.onnx [--fold-through-qdq] [--fold-input-initializers] [--rewrite-bn] [-v]
    foldnorm demo [--quick]

Exit codes: 0 done; 1 the folded model failed verification (nothing written, unless --force); 2 a
mistake in the command, a file foldnorm refuses, or verification's process crashing, reported as one line on
stderr, never a traceback.
On a failure nothing is written. Progress goes to stderr: with -v every step as it starts; on a terminal
a step that takes more than a couple of seconds; -q prints nothing but errors.
"""
import argparse
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

# Only the standard library is loaded here: --help, --version and usage errors never pay for onnx,
# onnxruntime or NumPy, which each command imports when it runs.

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# How the command line says what the library's messages ask for (foldnorm.fold.errors.PYTHON_WORDS).
CLI_WORDS = {
    "shapes": "--shape NAME=d0,d1,...",
    "shape_of": "--shape %(input)s=d0,d1,...",
    "no_verify": "--no-verify",
    "fold_through_qdq": "--fold-through-qdq",
    "fold_input_initializers": "--fold-input-initializers",
    "rewrite_bn": "--rewrite-bn",
}


class UsageError(Exception):
    """A mistake on the command line; argparse's own errors arrive as this too."""


class Terminated(Exception):
    """SIGTERM arrived: raised where the program is, so that files being written are cleaned up."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError("%s: error: %s" % (self.prog, message))


def main(argv=None):
    """Run the command line with `argv` (sys.argv[1:] when None); returns the exit code."""
    previous_handler = None
    try:
        previous_handler = _raise_on_sigterm()
        parser = _build_parser()
        with warnings.catch_warnings():
            # Third-party warnings (NumPy on extreme tolerances, onnx deprecations) are not the user's
            # business; what matters reaches them as foldnorm's own lines.
            warnings.simplefilter("ignore")
            args = parser.parse_args(argv)
            if args.command is None:
                raise UsageError("foldnorm: error: choose a command: fold, inspect or demo (foldnorm --help shows "
                                 "them)")
            return args.run(args)
    except SystemExit as exit_request:  # --help and --version exit through argparse
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_OK
    except UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except _fold_error() as error:
        return _fail("foldnorm: error: %s" % error.worded(CLI_WORDS), EXIT_USAGE)
    except MemoryError:
        return _fail("foldnorm: error: out of memory; the model, or the inputs it asks verification to make, "
                     "are too large for this machine (--no-verify skips verification)", EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("foldnorm: interrupted", EXIT_INTERRUPTED)
    except Terminated:
        return _fail("foldnorm: terminated; nothing written", 128 + signal.SIGTERM)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _fold_error():
    """FoldError once a command has loaded the fold pass; before that none can have been raised, and the
    empty tuple matches no exception (importing it here would load onnx for --help)."""
    errors = sys.modules.get("foldnorm.fold.errors")
    return errors.FoldError if errors is not None else ()


def _raise_on_sigterm():
    """Turn SIGTERM into Terminated (in the main thread only, where Python runs handlers); returns the
    handler it replaced, or None when it could not install one."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminate)


def _build_parser():
    from ._version import __version__

    parser = _Parser(
        prog="foldnorm",
        description="Fold BatchNormalization into neighbouring layers of ONNX models, proven against the original "
        "in onnxruntime; `foldnorm demo` also runs the normalization kernels. `foldnorm COMMAND --help` tells more.",
        epilog="Exit codes: 0 done; 1 the folded model failed verification (nothing written without --force); 2 a "
        "mistake in the command or a model foldnorm refuses (one line on stderr); 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version="foldnorm %s" % __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    fold = commands.add_parser(
        "fold",
        help="fold normalization into neighbouring layers, verify against onnxruntime, write the result",
        description="Fold every inference-mode BatchNormalization that can be folded exactly, verify the result "
        "against the original in onnxruntime, and write it (atomically; the input is never touched).",
    )
    fold.add_argument("model", metavar="MODEL.onnx", help="the model to fold")
    fold.add_argument("-o", "--output", metavar="OUT.onnx",
                      help="where to write (default: MODEL.folded.onnx beside the input)")
    fold.add_argument("--report", metavar="REPORT.json", help="also write the report as JSON")
    bn = fold.add_mutually_exclusive_group()
    bn.add_argument("--keep-bn", dest="rewrite_bn", action="store_false",
                    help="leave BNs that cannot fold as they are, unless Mul/Add after them merge into a rewrite "
                    "(the default)")
    bn.add_argument("--rewrite-bn", dest="rewrite_bn", action="store_true",
                    help="rewrite every BN that cannot fold as Mul and Add (onnxruntime may run them slower)")
    fold.add_argument("--no-verify", action="store_true", help="skip the comparison with the original in onnxruntime")
    fold.add_argument(
        "--shape", metavar="NAME=D0,D1,...", action="append", default=[], type=_parse_shape,
        help="the shape verification feeds an input with dynamic dims (repeatable; by default foldnorm "
        "chooses sizes onnxruntime runs, and checks two different shapes)",
    )
    fold.add_argument("--rtol", type=_tolerance("--rtol"),
                      help="relative tolerance (default 1e-4 for float32/64 outputs, 1e-2 for float16/bfloat16)")
    fold.add_argument("--atol", type=_tolerance("--atol"),
                      help="absolute tolerance (default rtol times each output's largest magnitude)")
    fold.add_argument("--force", action="store_true", help="write the result even when verification fails")
    fold.add_argument("--fold-through-qdq", action="store_true",
                      help="in a quantized model, also fold a BN that follows a QuantizeLinear/DequantizeLinear "
                      "pair after its layer, dropping the pair (close to the original, not exact)")
    fold.set_defaults(rewrite_bn=False)
    fold.add_argument("--fold-input-initializers", action="store_true",
                      help="treat initializers also listed as graph inputs as constants, and remove them from the "
                      "inputs (by default a caller may override them, and what reads them is left)")
    fold.add_argument("--steps", type=_tolerance("--steps"),
                      help="tolerance for quantized outputs, in quantization steps (default 1 when every quantized "
                      "fold is exact, else 3)")
    _add_verbosity(fold)
    fold.set_defaults(run=run_fold)

    inspect = commands.add_parser(
        "inspect", help="show what fold would do to each normalization, writing nothing",
        description="Fold the model in memory and print, node by node, what fold would do to each "
        "normalization and per-channel constant (folded into which layer, rewritten to Mul/Add, or left, with "
        "the reason), and the node and parameter counts before and after. Nothing is written and nothing is "
        "verified (fold does both); the report is the only output, so inspect takes no -q.",
    )
    inspect.add_argument("model", metavar="MODEL.onnx", help="the model to inspect (read only)")
    inspect.add_argument("--fold-through-qdq", action="store_true",
                         help="show the plan with the fold through QuantizeLinear/DequantizeLinear pairs")
    inspect.add_argument("--fold-input-initializers", action="store_true",
                         help="show the plan with initializers also listed as graph inputs taken as constants")
    inspect.add_argument("--rewrite-bn", action="store_true",
                         help="show the plan with every BN that cannot fold rewritten as Mul and Add")
    inspect.add_argument("-v", "--verbose", action="store_true", help="also show every step with its time on stderr")
    inspect.add_argument("-q", "--quiet", action=_Refused, nargs=0, help=argparse.SUPPRESS,
                         reason="inspect prints nothing but its report, so -q would leave nothing to see")
    inspect.set_defaults(run=run_inspect, quiet=False)

    demo = commands.add_parser("demo", help="fold a built-in CNN, time it in onnxruntime, and run the kernels")
    demo.add_argument("--quick", action="store_true", help="smaller sizes and fewer timing repeats")
    demo.set_defaults(run=run_demo_command)
    return parser


def _check_model_path(model):
    """The input model's path checked before anything heavy is imported (onnx alone takes a second to load):
    a missing file, a directory or a special file is a usage error told at once."""
    from .fold.io.paths import model_file_problem

    problem = model_file_problem(model)
    if problem is not None:
        raise UsageError("foldnorm: error: %s" % problem)


def run_fold(args):
    _check_model_path(args.model)
    progress = Progress(verbose=args.verbose, quiet=args.quiet)
    try:
        return _fold(args, progress)
    finally:
        progress.done()  # a progress line left on the terminal by an error is cleared before its message


def _fold(args, progress):
    verifier = None
    if not args.no_verify:
        from .fold.verification.isolated import Verifier

        # Started first, so that its imports (onnx, onnxruntime) overlap with this process's own and the fold.
        verifier = Verifier()
    try:
        return _fold_with(args, progress, verifier)
    finally:
        if verifier is not None:
            verifier.close()


def _fold_with(args, progress, verifier):
    from .fold.session import ModelSession

    source = Path(args.model)
    output = Path(args.output) if args.output else _default_output(source)
    report_path = Path(args.report) if args.report else None
    shapes = _collect_shapes(args.shape)
    _refuse_overwriting(source, output, "-o")
    _check_destination(output, "-o")
    if report_path is not None:
        _refuse_overwriting(source, report_path, "--report")
        _check_destination(report_path, "--report")
        if _same_path(report_path, output):
            raise UsageError("foldnorm: error: --report %s is the output model's path; choose another" % report_path)

    progress.step("reading %s" % source)
    with ModelSession(source, argument="MODEL.onnx", verifier=verifier) as session:
        protected = {os.path.realpath(source)} | set(session.data_files)
        for path, option in ((output, "-o"), (Path(str(output) + ".data"), "-o"), (report_path, "--report")):
            if path is not None and os.path.realpath(path) in protected:
                raise UsageError("foldnorm: error: %s %s would overwrite the input model or its external data"
                                 % (option, path))
        progress.step("folding")
        report = session.fold(rewrite_bn=args.rewrite_bn, fold_through_qdq=args.fold_through_qdq,
                              fold_input_initializers=args.fold_input_initializers)
        # Written into a hidden folder beside the output, verified there, moved into place at the end: a
        # failure anywhere (verification, a report that cannot be written) leaves nothing written.
        progress.step("writing %s" % output)
        session.stage(output)
        if not args.no_verify:
            session.verify(shapes=shapes, rtol=args.rtol, atol=args.atol, steps=args.steps, progress=progress.step)
        progress.done()
        if not args.quiet:
            print(report.format_text(every_node=args.verbose, words=CLI_WORDS), flush=True)

        verification = report.verification
        if verification is not None and not verification.passed:
            summary = _divergence_summary(verification)
            if not args.force:
                return _fail("foldnorm: verification failed: %s; nothing written (--force writes anyway)" % summary,
                             EXIT_VERIFICATION_FAILED)
            print("foldnorm: verification failed: %s; written anyway because of --force" % summary, file=sys.stderr)
        extra = []
        if report_path is not None:
            extra.append((report_path, (json.dumps(report.to_dict(CLI_WORDS), indent=2) + "\n").encode()))
        written = session.commit(extra)
    if not args.quiet:
        print("wrote %s" % ", ".join(str(p) for p in written))
    return EXIT_OK


def run_inspect(args):
    _check_model_path(args.model)
    from .fold import inspect_model

    progress = Progress(verbose=args.verbose, quiet=args.quiet)
    try:
        progress.step("reading and folding %s (nothing is written)" % args.model)
        report = inspect_model(Path(args.model), fold_through_qdq=args.fold_through_qdq, rewrite_bn=args.rewrite_bn,
                               fold_input_initializers=args.fold_input_initializers)
    finally:
        progress.done()
    if not args.quiet:
        print(report.format_text(every_node=True, words=CLI_WORDS))
    return EXIT_OK


def run_demo_command(args):
    from .demo import run_demo

    return run_demo(quick=args.quick)


def _default_output(source):
    name = source.name[: -len(".onnx")] if source.name.endswith(".onnx") else source.name
    return source.with_name(name + ".folded.onnx")


def _refuse_overwriting(source, path, option):
    if _same_path(source, path):
        raise UsageError("foldnorm: error: %s %s is the input model; choose another path (the input is never "
                         "touched)" % (option, path))


def _check_destination(path, option):
    """Refuse, before any work, a destination that could not be written anyway."""
    folder = path.absolute().parent
    if not folder.is_dir():
        raise UsageError("foldnorm: error: %s %s: the folder %s does not exist" % (option, path, folder))
    if path.is_dir():
        raise UsageError("foldnorm: error: %s %s is a directory; give a file name" % (option, path))
    _check_writable(path, option)


def _check_writable(path, option):
    """Create and remove a file in the destination's folder: the one test of writability that holds for
    every user, root included, and every file system (read-only mounts, ACLs)."""
    folder = path.absolute().parent
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".%s." % path.name, suffix=".probe", dir=folder)
    except OSError as error:
        raise UsageError("foldnorm: error: %s %s: cannot write in the folder %s (%s)"
                         % (option, path, folder, error.strerror or error)) from None
    os.close(descriptor)
    os.unlink(probe)


def _same_path(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _parse_shape(text):
    name, equals, dims = text.rpartition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError("expected NAME=D0,D1,... (like input=1,3,224,224), got %r" % text)
    try:
        sizes = [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("the dims of %r must be integers separated by commas" % text) from None
    if any(d < 0 for d in sizes):
        raise argparse.ArgumentTypeError("the dims of %r must not be negative" % text)
    return name, sizes


def _collect_shapes(entries):
    shapes = {}
    for name, dims in entries:
        if name in shapes:
            raise UsageError("foldnorm: error: --shape gives input %r twice" % name)
        shapes[name] = dims
    return shapes or None


def _tolerance(option):
    """An argparse type for --rtol / --atol: a finite number >= 0."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected a number, got %r" % text) from None
        if not (value >= 0.0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError("expected a finite non-negative number, got %r" % text)
        return value

    parse.__name__ = option.lstrip("-")
    return parse


def _divergence_summary(verification):
    failed = verification.failed_outputs
    first = failed[0]
    noise = "" if first.noise is None else ", the model's own noise %.3g" % first.noise
    detail = first.note or "max abs error %.3g, max rel error %.3g (rtol %.0e, atol %.1e%s)" % (
        first.max_abs_error, first.max_rel_error, first.rtol, first.atol, noise)
    more = " and %d more output%s" % (len(failed) - 1, "s" if len(failed) > 2 else "") if len(failed) > 1 else ""
    return "output %r diverged: %s%s" % (first.name, detail, more)


class _Refused(argparse.Action):
    """An option a command does not take, refused with the reason rather than argparse's "unrecognized"."""

    def __init__(self, *args, reason, **kwargs):
        super().__init__(*args, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("%s: %s" % (option_string, self.reason))


def _add_verbosity(command):
    group = command.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="show every step with its time on stderr, and every node in the report")


class Progress:
    """What foldnorm is doing, on stderr.

    verbose: every step as it starts, with the time since the command started. Otherwise, on a terminal:
    a step still running after SHOW_AFTER seconds appears on one line, which the next step replaces and
    done() clears. quiet, or stderr not a terminal: nothing.
    """

    SHOW_AFTER = 2.0

    def __init__(self, *, verbose=False, quiet=False, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.verbose = verbose and not quiet
        self.live = not quiet and not verbose and _is_terminal(self.stream)
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._timer = None
        self._current = None
        self._shown = False

    def step(self, message):
        with self._lock:
            self._cancel_timer()
            self._current = message
            if self.verbose:
                print("foldnorm: [%7.2f s] %s" % (time.perf_counter() - self.start, message), file=self.stream,
                      flush=True)
            elif self.live and (self._shown or self.SHOW_AFTER <= 0):
                self._write_line(message)
            elif self.live:
                self._timer = threading.Timer(self.SHOW_AFTER, self._show, args=(message,))
                self._timer.daemon = True
                self._timer.start()

    def done(self):
        with self._lock:
            self._cancel_timer()
            self._current = None
            if self._shown:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self._shown = False

    def _show(self, message):
        with self._lock:
            if self._current is message:
                self._write_line(message)

    def _write_line(self, message):
        self.stream.write("\r\033[Kfoldnorm: %s ..." % message)
        self.stream.flush()
        self._shown = True

    def _cancel_timer(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _fail(message, code):
    print(" ".join(message.split("\n")), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
