"""How the `foldnorm` command starts: what --help, --version and usage errors load, and Ctrl-C during start-up.

Each case runs the command in a fresh interpreter, started the way the installed `foldnorm` script starts
it (the entry point named in pyproject.toml), and looks at that interpreter's sys.modules or exit status:
no wall-clock time is asserted here (benchmarks/startup.py measures it).
"""
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import write_model

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("onnx", "onnxruntime", "numpy", "google.protobuf")


def entry_point():
    """The `foldnorm` script's target in pyproject.toml, as (module, function)."""
    text = (ROOT / "pyproject.toml").read_text()
    module, function = re.search(r'^foldnorm = "([\w.]+):(\w+)"$', text, re.M).groups()
    return module, function


def start_command(argv, prelude=""):
    """The `foldnorm` script's own lines after `prelude`, in a fresh interpreter; the finished process."""
    module, function = entry_point()
    code = "%s\nimport sys\nfrom %s import %s\nsys.argv = ['foldnorm'] + %r\nsys.exit(%s())\n" % (
        prelude, module, function, [str(a) for a in argv], function)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


# Prints, as the interpreter exits, which of the heavy libraries it had loaded.
REPORT_MODULES = """
import atexit, json, sys
HEAVY = %r
atexit.register(lambda: print("loaded:" + json.dumps(sorted(
    {h for h in HEAVY for m in sys.modules if m == h or m.startswith(h + ".")}))))
""" % (HEAVY,)


def loaded_libraries(result):
    line = [line for line in result.stdout.splitlines() if line.startswith("loaded:")][-1]
    return json.loads(line[len("loaded:"):])


@pytest.mark.parametrize("argv, code, fragment", [
    (["--help"], 0, "usage: foldnorm"),
    (["--version"], 0, "foldnorm "),
    (["fold", "--help"], 0, "usage: foldnorm fold"),
    (["inspect", "--help"], 0, "usage: foldnorm inspect"),
    ([], 2, "choose a command"),
    (["bogus"], 2, "invalid choice: 'bogus'"),
    (["fold"], 2, "the following arguments are required: MODEL.onnx"),
    (["fold", "model.onnx", "--rtol", "-1"], 2, "argument --rtol"),
    (["inspect", "model.onnx", "-q"], 2, "-q: inspect prints nothing but its report"),
    (["fold", "no-such-model.onnx"], 2, "no-such-model.onnx: no such file"),
    (["inspect", "no-such-model.onnx"], 2, "no-such-model.onnx: no such file"),
    (["fold", "."], 2, ". is a directory, not an ONNX model file"),
])
def test_help_version_and_usage_errors_load_no_heavy_library(argv, code, fragment):
    result = start_command(argv, REPORT_MODULES)
    assert result.returncode == code, result.stderr
    assert fragment in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert loaded_libraries(result) == []


def test_version_is_the_package_version():
    from foldnorm import __version__

    result = start_command(["--version"])
    assert result.returncode == 0 and result.stdout == "foldnorm %s\n" % __version__


def test_a_command_that_reads_a_model_does_load_them(tmp_path):
    # The check above can fail: a command that reads a model loads onnx in its own process; onnxruntime runs
    # in the verifying process only, so the command itself never loads it, with or without verification.
    for extra in ([], ["--no-verify"]):
        result = start_command(["fold", write_model(tmp_path), "-q", "-o", tmp_path / "out.onnx"] + extra,
                               REPORT_MODULES)
        assert result.returncode == 0, result.stderr
        assert set(loaded_libraries(result)) == set(HEAVY) - {"onnxruntime"}


# Sends this process SIGINT, once, when the import system is asked for the module named by INTERRUPT_AT:
# the KeyboardInterrupt is raised inside that module's import, as when Ctrl-C lands during start-up.
INTERRUPT_ON_IMPORT = """
import os, signal, sys
INTERRUPT_AT = %r

class InterruptOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == INTERRUPT_AT:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptOnImport())
"""


@pytest.mark.parametrize("command, module", [
    (["--help"], "foldnorm.cli"),                                    # the command line itself, before main()
    (["--help"], "argparse"),                                        # a standard module the command line loads
    (["fold", "{model}"], "numpy"),                                  # the libraries a command loads, once
    (["fold", "{model}"], "google.protobuf.descriptor"),             # main() has started
    (["fold", "{model}"], "onnx.onnx_cpp2py_export"),                # a compiled module
    (["fold", "{model}"], "foldnorm.fold.verification.isolated"),  # before the verifying process starts
    (["inspect", "{model}"], "foldnorm.fold.core.driver"),
    (["demo", "--quick"], "foldnorm.kernels._batch_norm"),
])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, command, module):
    model = write_model(tmp_path)
    argv = [a.format(model=model) for a in command]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = start_command(argv, INTERRUPT_ON_IMPORT % module)
    assert result.returncode == 128 + signal.SIGINT, (result.returncode, result.stderr)
    assert result.stderr == "foldnorm: interrupted\n"
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
