"""`python -m benchmarks ab --base REF`: the working tree against a git ref, on this machine, in this job.

1. The base is exported from git into a scratch folder and its extension built in place with this
   environment's Python and build tools; the working tree is the head, as `make install` built it.
2. The deterministic counts of both sides are taken at once under callgrind (counts.py).
3. The machine is checked (machine.py); then the rounds: each round runs one worker process per side
   (worker.py), base first in even rounds and head first in odd ones, each timing every kernel case from
   a fresh copy of its side's package (see `fresh_copy`).
4. Every figure's head/base ratio and interval come from the paired rounds (stats.py).

Exit code: 1 when a slowdown is flagged (a count above its threshold; or, on a quiet machine, a timing
both above its threshold and significant), 0 otherwise, 2 when the comparison cannot be made (a base that
is not a commit, a build that fails, a worker that crashes).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from . import counts, machine, stats
from .harness import TWICE_ENV, cpu_model, package_versions, usable_cores
from .kernels import QUICK_CASES, SMOKE_CASES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unusable(Exception):
    """The comparison cannot be made; the message says why (exit code 2)."""


MODES = {
    # kernel cases, rounds, inner calls per worker, fold pairs, count cases
    "quick": (QUICK_CASES, 20, 5, 250, counts.COUNT_CASES),
    "smoke": (SMOKE_CASES, 3, 2, 10, counts.SMOKE_COUNT_CASES),
}


def _log(text):
    print("benchmarks ab: " + text, file=sys.stderr, flush=True)


def _git(*args):
    result = subprocess.run(["git", "-C", REPO] + list(args), capture_output=True, text=True)
    if result.returncode != 0:
        raise Unusable("git %s failed: %s" % (" ".join(args), (result.stderr.strip().splitlines() or [""])[-1]))
    return result.stdout.strip()


def resolve(ref):
    """(full commit id, one-line description) of `ref`; Unusable when it names no commit here."""
    try:
        commit = _git("rev-parse", "--verify", "--quiet", "%s^{commit}" % ref)
    except Unusable:
        raise Unusable("base %r is not a commit in this repository (try a branch, tag or commit id; in CI "
                       "fetch the base branch first)" % ref) from None
    return commit, _shorten(_git("log", "-1", "--format=%h %s", commit))


def build_base(commit, folder):
    """Export `commit` into folder/base and build its extension in place; returns the folder."""
    root = os.path.join(folder, "base")
    os.makedirs(root)
    archive = subprocess.Popen(["git", "-C", REPO, "archive", "--format=tar", commit], stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", root], stdin=archive.stdout, capture_output=True)
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0:
        raise Unusable("could not export %s from git" % commit[:12])
    if not os.path.exists(os.path.join(root, "setup.py")):
        raise Unusable("the base %s has no setup.py to build" % commit[:12])
    env = dict(os.environ, FOLDNORM_REQUIRE_OPENMP="1")
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=root, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        tail = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-5:]
        raise Unusable("the base %s does not build:\n  %s" % (commit[:12], "\n  ".join(tail)))
    return root


def fresh_copy(root, folder):
    """A copy of root's foldnorm package in `folder` (returned), for one worker.

    Two byte-identical builds in two folders were measured up to 24% apart, round after round, on this
    project's VM: where a build's files lie in memory stays put for every process that loads them, so it
    biases one side for the whole comparison. A fresh copy per round and side makes that placement a
    random draw per round, which the rounds' statistics then average like any other noise.
    """
    shutil.copytree(os.path.join(root, "foldnorm"), os.path.join(folder, "foldnorm"),
                    ignore=shutil.ignore_patterns("*.c", "*.pyx", "*.pxd", "__pycache__"))
    return folder


def run_worker(root, cases, threads, inner, settle, fold_pairs, environ):
    command = [sys.executable, "-m", "benchmarks.worker", "--foldnorm-root", root, "--cases",
               counts.case_spec(cases), "--threads", ",".join(map(str, threads)), "--inner", str(inner),
               "--settle", repr(settle), "--fold-pairs", str(fold_pairs)]
    result = subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True)
    if result.returncode != 0:
        tail = [line for line in result.stderr.splitlines() if line.strip()][-3:]
        raise Unusable("a worker on %s failed (exit %d): %s" % (root, result.returncode, " | ".join(tail)))
    return json.loads(result.stdout.strip().splitlines()[-1])


def side_environments():
    """The workers' environments: the slowdown hook, when set, reaches the head's side only."""
    head = dict(os.environ)
    base = dict(os.environ)
    base.pop(TWICE_ENV, None)
    for env in (head, base):
        env.pop("PYTHONPATH", None)
    return base, head


def _settle(threads):
    from .harness import settle_seconds

    return settle_seconds(threads)


def ab(base_ref=None, base_root=None, mode="quick", rounds=None, threads=None, kernels=None,
       threshold=stats.DEFAULT_THRESHOLD, count_threshold=counts.DEFAULT_THRESHOLD,
       false_alarm=stats.DEFAULT_FALSE_ALARM, with_counts=True, out_dir=None, make_plots=True):
    """Run the comparison; returns the results dict (`exit_code` in it). Raises Unusable."""
    started = time.perf_counter()
    cases, default_rounds, inner, fold_pairs, count_cases = MODES[mode]
    rounds = rounds or default_rounds
    if kernels is not None:
        cases = [c for c in cases if c.kernel in kernels]
        count_cases = [c for c in count_cases if c.kernel in kernels]
    cores = usable_cores()
    threads = threads or sorted({1, cores})
    results = {"schema": 1, "kind": "ab", "mode": mode, "rounds": rounds, "inner_calls": inner,
               "threads": threads, "threshold": threshold, "count_threshold": count_threshold,
               "false_alarm": false_alarm, "notes": []}
    with tempfile.TemporaryDirectory(prefix="foldnorm-ab-") as scratch:
        if base_root is None:
            commit, description = resolve(base_ref)
            _log("building the base %s" % description)
            build_started = time.perf_counter()
            base_root = build_base(commit, scratch)
            results["base"] = {"ref": base_ref, "commit": commit, "description": description,
                               "build_seconds": time.perf_counter() - build_started}
        else:
            results["base"] = {"ref": None, "root": os.path.abspath(base_root),
                               "description": "the build in %s" % os.path.abspath(base_root)}
        results["head"] = {"root": REPO, "description": _head_description(),
                           "slowdown_injected": os.environ.get(TWICE_ENV) or None}
        base_env, head_env = side_environments()
        sides = {"base": (base_root, base_env), "head": (REPO, head_env)}

        results["counts"] = _counts(sides, count_cases, scratch, with_counts, count_threshold)

        _log("checking the machine")
        start_check = machine.check_start(machine.topology().get("physical_cores") or cores)
        monitor = machine.RunMonitor()
        settle = _settle(threads)
        per_side = {"base": {}, "head": {}}
        builds = {}
        for r in range(rounds):
            order = ("base", "head") if r % 2 == 0 else ("head", "base")
            _log("round %d/%d (%s first)" % (r + 1, rounds, order[0]))
            round_folder = os.path.join(scratch, "round-%d" % r)
            for side in order:
                root, env = sides[side]
                copy = fresh_copy(root, os.path.join(round_folder, side))
                report = run_worker(copy, cases, threads, inner, settle, fold_pairs, env)
                builds[side] = report["build"]
                for name, seconds in report["figures"].items():
                    per_side[side].setdefault(name, []).append(seconds)
                for key, why in report["skipped"].items():
                    _note_once(results["notes"], "%s: %s skipped: %s" % (side, key, why))
            shutil.rmtree(round_folder, ignore_errors=True)
        run_check = monitor.finish()
    check = machine.merge(("start", start_check), ("run", run_check))
    results["machine_check"] = check.as_dict()
    results["machine"] = {"cpu_model": cpu_model(), "usable_cores": cores, "topology": machine.topology(),
                          "caches": machine.caches(), "binding": machine.binding(), "settle_seconds": settle, "versions": package_versions(),
                          "builds": builds}
    if builds.get("base", {}).get("cflags") != builds.get("head", {}).get("cflags"):
        results["notes"].append("the two builds' compiler flags differ: base %r, head %r" % (
            builds.get("base", {}).get("cflags"), builds.get("head", {}).get("cflags")))

    complete = {side: {k: v for k, v in figures.items() if len(v) == rounds} for side, figures in per_side.items()}
    measured = {side: {k: v for k, v in figures.items() if not k.startswith("copy/")} for side, figures in complete.items()}
    controls = {side: {k: v for k, v in figures.items() if k.startswith("copy/")} for side, figures in complete.items()}
    comparisons, only_base, only_head = stats.compare_figures(measured["base"], measured["head"], threshold, false_alarm)
    control_rows, _, _ = stats.compare_figures(controls["base"], controls["head"], threshold, false_alarm)
    results["timings"] = [c.as_dict() for c in comparisons]
    results["controls"] = [c.as_dict() for c in control_rows]
    results["only_base"], results["only_head"] = only_base, only_head
    results["samples"] = complete
    if rounds < stats.minimum_rounds(len(comparisons), false_alarm):
        results["notes"].append("%d rounds are too few for any interval to exclude 1 over %d figures (%d needed): "
                                "no timing can be flagged" % (rounds, len(comparisons),
                                                             stats.minimum_rounds(len(comparisons), false_alarm)))
    results["verdict"] = verdict(results)
    results["exit_code"] = 1 if results["verdict"]["flagged"] else 0
    results["elapsed_seconds"] = time.perf_counter() - started
    if out_dir:
        write(results, out_dir, make_plots)
    return results


def _counts(sides, cases, scratch, enabled, threshold):
    if not enabled:
        return {"skipped": "turned off (--no-counts)"}
    if counts.valgrind() is None:
        return {"skipped": "valgrind is not installed (Debian: apt-get install valgrind): no deterministic signal"}
    _log("counting instructions and cache traffic under valgrind (both sides at once, about a minute)")
    try:
        pending = {side: counts.measure(root, cases, os.path.join(scratch, "counts-" + side), env)
                   for side, (root, env) in sides.items()}
        figures = {side: p.collect() for side, p in pending.items()}
    except counts.CountsUnavailable as error:
        return {"skipped": str(error)}
    elements = {c.key: c.elements for c in cases}
    return {"threshold": threshold, "base": figures["base"][0], "head": figures["head"][0],
            "skipped_cases": {side: f[1] for side, f in figures.items() if f[1]},
            "elements": elements, "rows": counts.compare(figures["base"][0], figures["head"][0], threshold)}


def verdict(results):
    """What flags, and whether the exit code may follow the clock."""
    busy = results["machine_check"]["busy"]
    clock = [c["name"] for c in results["timings"] if c["flagged"]]
    counted = [r["key"] for r in results["counts"].get("rows", []) if r["flagged"]]
    return {
        "clock_flagged": clock,
        "clock_reliable": not busy,
        "counts_flagged": counted,
        "counts_available": "rows" in results["counts"],
        "flagged": bool(counted) or (bool(clock) and not busy),
    }


def _head_description():
    try:
        head = _shorten(_git("log", "-1", "--format=%h %s"))
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except Unusable:
        return "the working tree"
    return "working tree at %s%s" % (head, " (with uncommitted changes)" if dirty else "")


def _shorten(text, limit=72):
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _note_once(notes, text):
    if text not in notes:
        notes.append(text)


def write(results, out_dir, make_plots=True):
    from . import ab_report

    os.makedirs(out_dir, exist_ok=True)
    results["plots"] = []
    if make_plots:
        paths, note = ab_report.plot(results, out_dir)
        results["plots"] = [os.path.basename(p) for p in paths]
        if note:
            results["notes"].append(note)
    text = ab_report.markdown(results)
    with open(os.path.join(out_dir, "ab.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, "ab.md"), "w") as f:
        f.write(text + "\n")
    return text
