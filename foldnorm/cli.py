"""The `foldnorm` command: fold, inspect, demo.

    foldnorm fold MODEL.onnx [-o OUT.onnx] [--report REPORT.json] [--keep-bn] [--no-verify]
                  [--shape NAME=1,3,224,224 ...] [--rtol R] [--atol A] [--force]
    foldnorm inspect MODEL.onnx
    foldnorm demo [--quick]

Exit codes: 0 done; 1 the folded model failed verification (nothing written, unless --force); 2 a
mistake in the command or a file foldnorm refuses, reported as one line on stderr, never a traceback.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

from .fold.errors import FoldError

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake on the command line; argparse's own errors arrive as this too."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError("%s: error: %s" % (self.prog, message))


def main(argv=None):
    """Run the command line with `argv` (sys.argv[1:] when None); returns the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("foldnorm: error: choose a command: fold, inspect or demo (foldnorm --help shows them)")
        return args.run(args)
    except SystemExit as exit_request:  # --help and --version exit through argparse
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_OK
    except UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except FoldError as error:
        return _fail("foldnorm: error: %s" % error, EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("foldnorm: interrupted", 130)


def _build_parser():
    from ._version import __version__

    parser = _Parser(prog="foldnorm", description="Fold BatchNormalization into neighbouring layers of ONNX models.")
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
    fold.add_argument("--keep-bn", action="store_true",
                      help="leave BNs that cannot fold as they are (no Mul/Add rewrite)")
    fold.add_argument("--no-verify", action="store_true", help="skip the comparison with the original in onnxruntime")
    fold.add_argument(
        "--shape", metavar="NAME=D0,D1,...", action="append", default=[], type=_parse_shape,
        help="the size of an input with dynamic dims, for verification (repeatable)",
    )
    fold.add_argument("--rtol", type=_tolerance("--rtol"),
                      help="relative tolerance (default 1e-4 for float32/64 outputs, 1e-2 for float16/bfloat16)")
    fold.add_argument("--atol", type=_tolerance("--atol"),
                      help="absolute tolerance (default rtol times each output's largest magnitude)")
    fold.add_argument("--force", action="store_true", help="write the result even when verification fails")
    fold.set_defaults(run=run_fold)

    inspect = commands.add_parser("inspect", help="show what fold would do to each normalization, writing nothing")
    inspect.add_argument("model", metavar="MODEL.onnx")
    inspect.set_defaults(run=run_inspect)

    demo = commands.add_parser("demo", help="fold a built-in CNN, time it in onnxruntime, and run the kernels")
    demo.add_argument("--quick", action="store_true", help="smaller sizes and fewer timing repeats")
    demo.set_defaults(run=run_demo_command)
    return parser


def run_fold(args):
    from .fold.modelio import external_data_files, save_model, write_file_atomically
    from .fold.verification import verify

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

    protected = {os.path.realpath(source)} | external_data_files(source)
    for path, option in ((output, "-o"), (Path(str(output) + ".data"), "-o"), (report_path, "--report")):
        if path is not None and os.path.realpath(path) in protected:
            raise UsageError("foldnorm: error: %s %s would overwrite the input model or its external data"
                             % (option, path))

    from .fold import fold_model

    # Read and folded in place (one copy of the model in memory); verification reads the original again.
    folded, report = fold_model(source, keep_bn=args.keep_bn, verify=False)
    report.model = str(source)
    if not args.no_verify:
        report.verification = verify(source, folded, shapes=shapes, rtol=args.rtol, atol=args.atol)
    print(report.format_text())

    verification = report.verification
    if verification is not None and not verification.passed:
        summary = _divergence_summary(verification)
        if not args.force:
            return _fail("foldnorm: verification failed: %s; nothing written (--force writes anyway)" % summary,
                         EXIT_VERIFICATION_FAILED)
        print("foldnorm: verification failed: %s; written anyway because of --force" % summary, file=sys.stderr)

    written = [str(p) for p in save_model(folded, output, external_data=bool(external_data_files(source)))]
    if report_path is not None:
        write_file_atomically(report_path, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
        written.append(str(report_path))
    print("wrote %s" % ", ".join(written))
    return EXIT_OK


def run_inspect(args):
    from .fold import inspect_model

    report = inspect_model(Path(args.model))
    print(report.format_text(every_node=True))
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
    detail = first.note or "max abs error %.3g, max rel error %.3g (rtol %.0e, atol %.1e)" % (
        first.max_abs_error, first.max_rel_error, first.rtol, first.atol)
    more = " and %d more output%s" % (len(failed) - 1, "s" if len(failed) > 2 else "") if len(failed) > 1 else ""
    return "output %r diverged: %s%s" % (first.name, detail, more)


def _fail(message, code):
    print(" ".join(message.split("\n")), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
