"""How long the `foldnorm` command takes to answer when it has nothing to load: --version, --help and a
usage error, each in a fresh interpreter, beside the interpreter alone (`python -c pass`).

Each figure is the median wall time of repeated runs of the whole process, rounds interleaved so that a
burst of load touches every command alike; the machine check of the kernel benchmarks says whether the
machine was quiet enough to believe them. The commands start the way the installed script does (the
entry point in pyproject.toml), from this checkout.
"""
import os
import statistics
import subprocess
import sys
import time

from . import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_SECONDS = 0.3
COMMANDS = (
    ("python -c pass (the interpreter alone)", None),
    ("foldnorm --version", ["--version"]),
    ("foldnorm --help", ["--help"]),
    ("foldnorm fold (usage error: no model)", ["fold"]),
)


def add_arguments(parser):
    parser.add_argument("--runs", type=int, default=20, help="runs of each command (default 20)")
    parser.add_argument("--no-check", action="store_true", help="skip the machine check (about 2 s)")


def command_line(argv):
    """The interpreter running the `foldnorm` script's lines with argv, or doing nothing when argv is None."""
    if argv is None:
        return [sys.executable, "-c", "pass"]
    return [sys.executable, "-c", "import sys; from foldnorm.__main__ import run; sys.argv = ['foldnorm'] + %r; "
            "sys.exit(run())" % argv]


def time_commands(runs):
    """{label: [seconds per run]} for every command, rounds interleaved."""
    times = {label: [] for label, _ in COMMANDS}
    for _ in range(runs + 1):  # the first round warms the file cache and is dropped
        for label, argv in COMMANDS:
            start = time.perf_counter()
            subprocess.run(command_line(argv), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[label].append(time.perf_counter() - start)
    return {label: values[1:] for label, values in times.items()}


def main(args):
    if args.runs < 1:
        print("benchmarks startup: --runs must be at least 1, got %d" % args.runs, file=sys.stderr)
        return 2
    check = None if args.no_check else machine.check_start(len(os.sched_getaffinity(0)))
    times = time_commands(args.runs)
    lines = ["### foldnorm start-up: median of %d runs (min-max), a fresh interpreter each" % args.runs, ""]
    if check is not None:
        lines += machine.banner(check.as_dict())
    lines += ["| command | median s | min-max s | target |", "|---|--:|--:|---|"]
    for label, argv in COMMANDS:
        values = times[label]
        median = statistics.median(values)
        target = "" if argv is None else ("met" if median <= TARGET_SECONDS else "**not met**") + \
            " (<= %.1f s)" % TARGET_SECONDS
        lines.append("| %s | %.3f | %.3f-%.3f | %s |" % (label, median, min(values), max(values), target))
    print("\n".join(lines))
    return 0
