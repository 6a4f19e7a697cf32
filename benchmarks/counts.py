"""The deterministic signal: per kernel call, instructions and last-level-cache traffic under valgrind.

Each kernel runs once at 1 thread inside a callgrind region (see worker.py), with callgrind's cache
simulator set to one fixed cache (32 KiB L1s, a 4 MiB last level: the same numbers on every machine). The
tensors are 8 MiB, twice that last level, so every pass the kernel makes over memory shows up as misses.
Reported per element of the tensor:

- instructions: moves when the work moves: a second pass, a vector loop that became scalar, a slower
  statistics formula, extra checks per element;
- LL bytes: last-level misses (reads and writes) times the 64-byte line: moves when the memory traffic
  moves: an extra pass over x or y, a temporary the size of the tensor, a row or group pass that no
  longer stays in cache.

Neither sees what only the clock sees: threads (the counts are single-threaded), bandwidth, frequency,
streaming stores (the simulator treats them as ordinary writes), or an instruction that became slower
without becoming more numerous.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from .fused import FUSED_COUNT_CASES
from .kernels import KernelCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE_BYTES = 64
CACHES = ["--I1=32768,8,64", "--D1=32768,8,64", "--LL=4194304,16,64"]
DEFAULT_THRESHOLD = 0.03

# 2**21 float32 values, 8 MiB per tensor.
COUNT_CASES = [
    KernelCase("batch_norm", (8, 64, 64, 64)),
    KernelCase("batch_norm", (8, 64, 64, 64), channels_last=True),
    KernelCase("batch_norm_train", (8, 64, 64, 64)),
    KernelCase("batch_norm_backward", (8, 64, 64, 64)),
    KernelCase("layer_norm", (2048, 1024)),
    KernelCase("layer_norm_backward", (2048, 1024)),
    KernelCase("rms_norm", (2048, 1024)),
    KernelCase("rms_norm_backward", (2048, 1024)),
    KernelCase("group_norm", (8, 64, 64, 64), groups=32),
    KernelCase("group_norm_backward", (8, 64, 64, 64), groups=32),
    KernelCase("instance_norm", (8, 64, 64, 64)),
    KernelCase("instance_norm_backward", (8, 64, 64, 64)),
] + FUSED_COUNT_CASES
SMOKE_COUNT_CASES = [COUNT_CASES[0], COUNT_CASES[4]]


class CountsUnavailable(Exception):
    """valgrind is missing or failed; the message says which, for the report."""


def valgrind():
    """The valgrind executable, or None when it is not installed."""
    return shutil.which("valgrind")


def case_spec(cases):
    return json.dumps([[c.kernel, list(c.shape), c.groups, c.channels_last] for c in cases])


def parse_dump(text):
    """{event: count} from the `events:` and `summary:` lines of a callgrind output file."""
    events = summary = None
    for line in text.splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:"):
            summary = [int(v) for v in line.split()[1:]]
    if events is None or summary is None:
        raise ValueError("not a callgrind output file (no events or summary line)")
    return dict(zip(events, summary + [0] * (len(events) - len(summary))))


def per_element(events, elements):
    """The figures of one region: instructions and last-level bytes (read + written), per element."""
    misses = events.get("DLmr", 0) + events.get("DLmw", 0) + events.get("ILmr", 0)
    return {"instructions": events["Ir"] / elements, "ll_bytes": misses * LINE_BYTES / elements}


def measure(foldnorm_root, cases, scratch, environ=None, python=sys.executable, timeout=900):
    """Start callgrind on the counts worker; returns a Popen whose `collect` gives the figures.

    Runs in the background (the sides of an A/B are counted at the same time: counts do not depend on
    the machine's load). `collect()` returns ({case key: {"instructions", "ll_bytes"}}, {key: skipped}).
    """
    tool = valgrind()
    if tool is None:
        raise CountsUnavailable("valgrind is not installed (Debian: apt-get install valgrind)")
    os.makedirs(scratch, exist_ok=True)
    env = dict(os.environ if environ is None else environ)
    env["PYTHONHASHSEED"] = "0"
    env["OMP_NUM_THREADS"] = "1"
    command = [tool, "--tool=callgrind", "--cache-sim=yes"] + CACHES + [
        "--zero-before=getpgrp", "--dump-before=getppid", "--dump-instr=no", "--compress-strings=no",
        "--callgrind-out-file=%s" % os.path.join(scratch, "callgrind.out"),
        python, "-m", "benchmarks.worker", "--counts", "--foldnorm-root", foldnorm_root,
        "--cases", case_spec(cases),
    ]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    return _Pending(process, scratch, cases, timeout)


class _Pending:
    def __init__(self, process, scratch, cases, timeout):
        self.process, self.scratch, self.cases, self.timeout = process, scratch, cases, timeout

    def collect(self):
        try:
            out, err = self.process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise CountsUnavailable("valgrind ran past %d s" % self.timeout) from None
        if self.process.returncode != 0:
            tail = [line for line in err.splitlines() if line.strip()][-3:]
            raise CountsUnavailable("valgrind run failed (exit %d): %s" % (self.process.returncode, " | ".join(tail)))
        report = json.loads(out.strip().splitlines()[-1])
        dumps = sorted((f for f in os.listdir(self.scratch) if f.startswith("callgrind.out.")),
                       key=lambda name: int(name.rsplit(".", 1)[1]))
        if len(dumps) != len(report["regions"]):
            raise CountsUnavailable("callgrind wrote %d regions for %d kernels" % (len(dumps), len(report["regions"])))
        by_key = {c.key: c for c in self.cases}
        figures = {}
        for key, name in zip(report["regions"], dumps):
            with open(os.path.join(self.scratch, name)) as f:
                figures[key] = per_element(parse_dump(f.read()), by_key[key].elements)
        return figures, report["skipped"]


def compare(base, head, threshold=DEFAULT_THRESHOLD):
    """Rows per kernel case both sides counted: each figure's head/base ratio, flagged above 1 + threshold."""
    rows = []
    for key in [k for k in base if k in head]:
        row = {"key": key, "flagged": False}
        for figure in ("instructions", "ll_bytes"):
            b, h = base[key][figure], head[key][figure]
            ratio = h / b if b else (1.0 if not h else float("inf"))
            row[figure] = {"base": b, "head": h, "ratio": ratio, "flagged": ratio > 1 + threshold}
            row["flagged"] = row["flagged"] or row[figure]["flagged"]
        rows.append(row)
    return rows


def run_counts(foldnorm_root, cases):
    """Count the cases for one build here and now (for `python -m benchmarks counts`)."""
    with tempfile.TemporaryDirectory() as scratch:
        return measure(foldnorm_root, cases, scratch).collect()


def markdown(figures, skipped, cases):
    """The counts of one build as a table."""
    lines = ["| kernel | shape | instructions per element | LL bytes per element |", "|---|---|--:|--:|"]
    for case in cases:
        if case.key in figures:
            lines.append("| %s | %s | %.3f | %.2f |" % (case.label, case.shape_label, figures[case.key]["instructions"],
                                                     figures[case.key]["ll_bytes"]))
        elif case.key in skipped:
            lines.append("| %s | %s | skipped: %s | |" % (case.label, case.shape_label, skipped[case.key]))
    return "\n".join(lines)
