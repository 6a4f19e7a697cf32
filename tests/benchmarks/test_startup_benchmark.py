"""`python -m benchmarks startup`: every command it times runs and answers as the command line should
(no time is asserted; the figures are the benchmark's to show)."""
import subprocess

import pytest

from benchmarks import startup
from benchmarks.__main__ import main


ANSWERS = {"--version": (0, "foldnorm "), "--help": (0, "usage: foldnorm"),
           "fold": (2, "foldnorm fold: error: the following arguments are required: MODEL.onnx")}


@pytest.mark.parametrize("label, argv", [c for c in startup.COMMANDS if c[1] is not None])
def test_each_timed_command_is_the_foldnorm_command_answering_without_work(label, argv):
    result = subprocess.run(startup.command_line(argv), cwd=startup.REPO, capture_output=True, text=True)
    code, start = ANSWERS[argv[0]]
    assert result.returncode == code, result.stderr
    assert (result.stdout + result.stderr).startswith(start)


def test_the_table_has_a_median_for_every_command(capsys):
    assert main(["startup", "--runs", "1", "--no-check"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "median" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == [label for label, _ in startup.COMMANDS]
    assert all(float(row.split(" | ")[1]) > 0 for row in rows)


def test_fewer_than_one_run_is_refused(capsys):
    assert main(["startup", "--runs", "0", "--no-check"]) == 2
    assert "--runs must be at least 1" in capsys.readouterr().err
