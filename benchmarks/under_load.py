"""The kernels on a busy machine: latency beside other processes spinning, and two processes sharing the cores.

    python -m benchmarks under-load [--spinners N] [--seconds 1.0] [--min-calls 300] [--rounds 3]
        [--settings default,one_thread,...] [--base-root DIR] [--throughput-seconds 3] [--smoke] [--out FILE]

`--spinners` processes (`while True: pass`; default one per usable core) run while the latencies are
taken, so the machine has more runnable threads than cores, as on a shared box or beside a data loader.
Each call of CALLS (float32) is timed under every setting: foldnorm by default, with `num_threads=1`, with
workers that sleep as soon as they are idle (no spin), torch with its own default threads, and, given
`--base-root`, another built checkout of foldnorm by default and with OMP_WAIT_POLICY=passive. Each
setting runs in a fresh process of its own, calling back to back for `--seconds` and at least its share
of `--min-calls` after a warm-up, timing every call; the settings take turns for `--rounds` rounds, each
round starting with a different one, and every latency of a setting is pooled before p50, p99 and the
mean are taken. The verdict per call: the default's mean and p99 each at most RATIO_LIMIT times, or within
SLACK_MS of, those of `num_threads=1`.

Then the throughput check, with the spinners stopped: two processes of one setting call THROUGHPUT_CALL
in a loop at the same time for `--throughput-seconds`, and their calls per second are summed; the
settings take turns for `--rounds` rounds. The verdict: the default's summed throughput (median over the
rounds) at least THROUGHPUT_LIMIT times that of `num_threads=1` in each process.
"""
import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from .counts import case_spec
from .harness import Unavailable, usable_cores
from .kernels import BENCHES, KernelCase, cases_from_spec
from .machine import caches

CALLS = (
    KernelCase("batch_norm", (32, 64, 28, 28)),
    KernelCase("batch_norm_train", (256, 64)),
    KernelCase("batch_norm_train", (32, 512, 7, 7)),
    KernelCase("batch_norm_train", (64, 128, 14, 14)),
    KernelCase("batch_norm_backward", (64, 128, 14, 14)),
    KernelCase("layer_norm", (8192, 768)),
    KernelCase("rms_norm", (64, 768)),
    KernelCase("group_norm", (16, 256, 32, 32), groups=32),
)
THROUGHPUT_CALL = KernelCase("batch_norm_train", (64, 128, 14, 14))
SMOKE_CALLS = (
    KernelCase("batch_norm_train", (8, 4)),
    KernelCase("layer_norm", (4, 16)),
    KernelCase("group_norm", (2, 64, 2, 2), groups=32),
)
SMOKE_THROUGHPUT_CALL = KernelCase("batch_norm_train", (8, 4))

RATIO_LIMIT = 1.25
SLACK_MS = 0.05
THROUGHPUT_LIMIT = 0.9
WARMUP_SECONDS = 0.2
WARMUP_CALLS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Setting:
    """How one worker process calls the kernels: which library, threads, workers' spin, which checkout."""

    name: str
    label: str
    library: str = "foldnorm"
    num_threads: int = None  # passed to every call; None: the default
    spin_ns: int = None  # foldnorm's idle workers' spin (kernels._runtime.set_spin); None: the default
    base: bool = False  # foldnorm from --base-root
    environment: tuple = ()  # (name, value) pairs set for the worker


SETTINGS = (
    Setting("default", "default"),
    Setting("one_thread", "num_threads=1", num_threads=1),
    Setting("no_spin", "workers never spin", spin_ns=0),
    Setting("torch", "torch", library="torch"),
    Setting("base", "base", base=True),
    Setting("base_passive", "base, OMP_WAIT_POLICY=passive", base=True,
            environment=(("OMP_WAIT_POLICY", "passive"),)),
)
BY_NAME = {s.name: s for s in SETTINGS}


def call_label(case):
    text = "%s (%s)" % (case.kernel, ", ".join(map(str, case.shape)))
    return text + (", %d groups" % case.groups if case.groups else "")


# ---------------------------------------------------------------------------------------------------
# The worker: one setting, one call, in a process of its own


def _prepare(setting, case, foldnorm_root):
    """(call, facts): call() runs the case once as the setting says; facts: threads, vector path, origin."""
    import numpy as np

    if setting.library == "torch":
        import torch

        call = BENCHES[case.kernel](case, np.random.default_rng(0)).torch(None)
        return call, {"threads": torch.get_num_threads(), "vector_path": None}
    if setting.base:
        from .worker import _load_foldnorm

        _load_foldnorm(foldnorm_root)
    import foldnorm

    runtime = _runtime_module()
    if setting.spin_ns is not None:
        if not hasattr(runtime, "set_spin"):
            raise SystemExit("this foldnorm has no workers' spin setting (kernels._runtime.set_spin)")
        runtime.set_spin(setting.spin_ns)
    call = BENCHES[case.kernel](case, np.random.default_rng(0)).foldnorm(setting.num_threads)
    build = getattr(foldnorm, "build_info", dict)()
    return call, {"threads": setting.num_threads or foldnorm.get_num_threads(),
                  "vector_path": build.get("vector_path"), "foldnorm_file": foldnorm.__file__}


def _runtime_module():
    import importlib

    try:
        return importlib.import_module("foldnorm.kernels._runtime")
    except ImportError:
        return None


def _pool_stats():
    runtime = _runtime_module()
    return runtime.pool_stats() if hasattr(runtime, "pool_stats") else None


def _warm_up(call):
    end = time.perf_counter() + WARMUP_SECONDS
    for _ in range(WARMUP_CALLS):
        call()
    while time.perf_counter() < end:
        call()


def latency_worker(setting, case, seconds, min_calls, foldnorm_root=None):
    """Latencies (seconds) of back-to-back calls: for `seconds` and at least `min_calls`, after a warm-up."""
    call, facts = _prepare(setting, case, foldnorm_root)
    _warm_up(call)
    clock = time.perf_counter
    latencies = []
    pool_before = _pool_stats()
    gc.disable()
    end = clock() + seconds
    while True:
        start = clock()
        call()
        stop = clock()
        latencies.append(stop - start)
        if stop >= end and len(latencies) >= min_calls:
            break
    gc.enable()
    pool_after = _pool_stats()
    if pool_before is not None:
        facts["pool"] = {k: pool_after[k] - pool_before[k] for k in pool_after}
    return dict(facts, setting=setting.name, latencies=latencies)


def throughput_worker(setting, case, seconds, foldnorm_root=None):
    """Calls in a loop for `seconds`, started when the driver writes a line (after this one printed `ready`)."""
    call, facts = _prepare(setting, case, foldnorm_root)
    _warm_up(call)
    print("ready", flush=True)
    sys.stdin.readline()
    clock = time.perf_counter
    calls = 0
    start = clock()
    end = start + seconds
    while True:
        call()
        calls += 1
        stop = clock()
        if stop >= end:
            break
    return dict(facts, setting=setting.name, calls=calls, seconds=stop - start)


# ---------------------------------------------------------------------------------------------------
# The driver: spinners, workers taking turns, statistics, verdicts


def start_spinners(count):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_spinners(spinners):
    for spinner in spinners:
        spinner.kill()
    for spinner in spinners:
        spinner.wait()


def _worker_command(setting, case, base_root, *extra):
    command = [sys.executable, "-m", "benchmarks.under_load", "--worker", setting.name,
               "--case", case_spec([case])] + list(extra)
    if setting.base:
        command += ["--base-root", base_root]
    return command


def _worker_environment(setting):
    return dict(os.environ, **dict(setting.environment))


def _error_line(stderr, returncode):
    lines = [line for line in (stderr or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "exit %d" % returncode


def run_latency_worker(setting, case, seconds, min_calls, base_root=None):
    """The worker's result, from a fresh interpreter; {"error": line} when the setting cannot run here."""
    command = _worker_command(setting, case, base_root, "--seconds", repr(seconds), "--min-calls", str(min_calls))
    done = subprocess.run(command, cwd=ROOT, env=_worker_environment(setting), capture_output=True, text=True)
    if done.returncode != 0:
        return {"setting": setting.name, "error": _error_line(done.stderr, done.returncode)}
    return json.loads(done.stdout)


def run_throughput_pair(setting, case, seconds, base_root=None):
    """Summed calls per second of two processes of `setting` calling `case` at once, or {"error": line}."""
    command = _worker_command(setting, case, base_root, "--throughput", "--seconds", repr(seconds))
    processes = [subprocess.Popen(command, cwd=ROOT, env=_worker_environment(setting), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        ready = [process.stdout.readline().strip() == "ready" for process in processes]
        if not all(ready):
            for process in processes:
                process.kill()
            failed = processes[ready.index(False)]
            return {"error": _error_line(failed.communicate()[1], failed.wait())}
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        results = []
        for process in processes:
            out, err = process.communicate()
            if process.returncode != 0:
                return {"error": _error_line(err, process.returncode)}
            results.append(json.loads(out))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return {"calls_per_second": sum(r["calls"] / r["seconds"] for r in results),
            "calls": [r["calls"] for r in results], "threads": results[0]["threads"]}


def percentile(values, q):
    """The q-th percentile (0-100) of values, linear between the two nearest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(latencies):
    return {"p50_ms": 1e3 * percentile(latencies, 50), "p99_ms": 1e3 * percentile(latencies, 99),
            "mean_ms": 1e3 * statistics.fmean(latencies), "calls": len(latencies)}


def rotations(items, rounds):
    """`items` once per round, each round starting one item later."""
    items = list(items)
    for round_index in range(rounds):
        shift = round_index % len(items)
        yield items[shift:] + items[:shift]


def measure_call(case, settings, seconds, min_calls, rounds, base_root=None):
    """{setting name: pooled summary with each round's, threads (and pool counters), or error} for one call."""
    by_round = {s.name: [] for s in settings}
    facts, errors = {}, {}
    per_worker = math.ceil(min_calls / rounds)
    for order in rotations(settings, rounds):
        for setting in order:
            if setting.name in errors:
                continue
            result = run_latency_worker(setting, case, seconds, per_worker, base_root)
            if "error" in result:
                errors[setting.name] = result["error"]
                continue
            by_round[setting.name].append(result.pop("latencies"))
            pool = result.pop("pool", None)
            if pool is not None:
                totals = facts.get(setting.name, {}).get("pool", {})
                result["pool"] = {k: totals.get(k, 0) + v for k, v in pool.items()}
            facts[setting.name] = result
    summary = {}
    for setting in settings:
        if setting.name in errors:
            summary[setting.name] = {"error": errors[setting.name]}
            continue
        fact = facts[setting.name]
        rounds_of_setting = by_round[setting.name]
        summary[setting.name] = dict(summarize([t for r in rounds_of_setting for t in r]), threads=fact["threads"],
                                     vector_path=fact.get("vector_path"),
                                     rounds=[summarize(r) for r in rounds_of_setting])
        if "pool" in fact:
            summary[setting.name]["pool"] = fact["pool"]
    return summary


def verdict(summary):
    """The default's mean and p99 against num_threads=1's: pooled ratio, excess in ms, met, and the ratio
    round by round (the two settings' workers of one round run one after the other, so a round's ratio shows
    how much the machine's load moved the pooled one); None without both settings."""
    ours, single = summary.get("default", {}), summary.get("one_thread", {})
    if "mean_ms" not in ours or "mean_ms" not in single:
        return None
    result = {}
    for metric in ("mean", "p99"):
        mine, theirs = ours[metric + "_ms"], single[metric + "_ms"]
        ratio = mine / theirs
        result[metric] = {"ratio": ratio, "excess_ms": mine - theirs,
                          "met": ratio <= RATIO_LIMIT or mine - theirs <= SLACK_MS,
                          "round_ratios": [a[metric + "_ms"] / b[metric + "_ms"]
                                           for a, b in zip(ours.get("rounds", []), single.get("rounds", []))]}
    result["met"] = result["mean"]["met"] and result["p99"]["met"]
    return result


def measure_throughput(case, settings, seconds, rounds, base_root=None):
    """{setting name: summed calls/s per round and their median, or error}, and the default's verdict."""
    per_round = {s.name: [] for s in settings}
    errors, threads = {}, {}
    for order in rotations(settings, rounds):
        for setting in order:
            if setting.name in errors:
                continue
            result = run_throughput_pair(setting, case, seconds, base_root)
            if "error" in result:
                errors[setting.name] = result["error"]
                continue
            per_round[setting.name].append(result["calls_per_second"])
            threads[setting.name] = result["threads"]
    figures = {}
    for setting in settings:
        if setting.name in errors:
            figures[setting.name] = {"error": errors[setting.name]}
        else:
            rates = per_round[setting.name]
            figures[setting.name] = {"calls_per_second": statistics.median(rates), "rounds": rates,
                                     "threads": threads[setting.name]}
    return {"call": call_record(case), "seconds": seconds, "settings": figures,
            "verdict": throughput_verdict(figures)}


def throughput_verdict(figures):
    ours, single = figures.get("default", {}), figures.get("one_thread", {})
    if "calls_per_second" not in ours or "calls_per_second" not in single:
        return None
    ratio = ours["calls_per_second"] / single["calls_per_second"]
    return {"ratio": ratio, "met": ratio >= THROUGHPUT_LIMIT}


def call_record(case):
    return {"kernel": case.kernel, "shape": list(case.shape), "groups": case.groups, "label": call_label(case)}


def run(calls, settings, spinners, seconds, min_calls, rounds, throughput_call=None, throughput_seconds=0.0,
        base_root=None):
    """Every figure of the benchmark, as the JSON output holds them."""
    facts = {"spinners": spinners, "cores": usable_cores(), "load_average_before": _load_average(),
             "seconds": seconds, "min_calls": min_calls, "rounds": rounds,
             "settings": [{"name": s.name, "label": s.label} for s in settings], "base_root": base_root,
             "build": _build_info(), "caches": caches()}
    results = []
    spinning = start_spinners(spinners)
    try:
        for case in calls:
            _log("%s, %d settings x %d rounds" % (call_label(case), len(settings), rounds))
            summary = measure_call(case, settings, seconds, min_calls, rounds, base_root)
            results.append({"call": call_record(case), "summary": summary, "verdict": verdict(summary)})
    finally:
        stop_spinners(spinning)
    facts["results"] = results
    facts["throughput"] = None
    if throughput_call is not None and throughput_seconds > 0:
        _log("throughput: two processes, %s" % call_label(throughput_call))
        facts["throughput"] = measure_throughput(throughput_call, settings, throughput_seconds, rounds, base_root)
    return facts


def _log(text):
    print("under load: " + text, file=sys.stderr, flush=True)


def _load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _build_info():
    try:
        import foldnorm
    except ImportError as error:
        return {"error": str(error)}
    return foldnorm.build_info()


def _cell(summary):
    if "error" in summary:
        return "n/a"
    return "%.3g / %.3g / %.3g" % (summary["p50_ms"], summary["p99_ms"], summary["mean_ms"])


def table(figures):
    """The Markdown report of `run`'s figures."""
    settings = [BY_NAME[s["name"]] for s in figures["settings"]]
    load = figures["load_average_before"]
    build = figures["build"]
    lines = [
        "Under load: %d spinning process%s on %d usable cores; load average before: %s; foldnorm's vector "
        "path: %s. Each setting in its own process, %d rounds of at least %g s, pooled over the rounds; "
        "latency in ms as p50 / p99 / mean." % (
            figures["spinners"], "" if figures["spinners"] == 1 else "es", figures["cores"],
            " ".join("%.2f" % v for v in load) if load else "n/a", build.get("vector_path", "n/a"),
            figures["rounds"], figures["seconds"]),
        "",
        "| call | " + " | ".join(s.label for s in settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    notes = []
    for entry in figures["results"]:
        label = entry["call"]["label"]
        cells = []
        for setting in settings:
            summary = entry["summary"][setting.name]
            cells.append(_cell(summary))
            if "error" in summary:
                notes.append("%s, %s: %s" % (label, setting.label, summary["error"]))
        lines.append("| %s | %s |" % (label, " | ".join(cells)))
    fewest = [s["calls"] for e in figures["results"] for s in e["summary"].values() if "calls" in s]
    if fewest:
        lines += ["", "Fewest calls pooled in a cell: %d. Threads by default: %s." % (min(fewest), ", ".join(
            "%s %s" % (s.label, _threads(figures["results"], s.name)) for s in settings))]
    lines += ["", "Default against num_threads=1: mean and p99 each at most %gx, or within %g ms." % (
        RATIO_LIMIT, SLACK_MS), "",
        "| call | mean default / 1 thread (pooled; each round's) | p99 default / 1 thread | met |",
        "|---|---|---|---|"]
    for entry in figures["results"]:
        v = entry["verdict"]
        if v is None:
            lines.append("| %s | n/a | n/a | n/a |" % entry["call"]["label"])
            continue
        lines.append("| %s | %s | %s | %s |" % (entry["call"]["label"], _ratio_cell(v["mean"]), _ratio_cell(v["p99"]),
                                                "yes" if v["met"] else "NO"))
    lines += _throughput_lines(figures["throughput"], settings, notes)
    if notes:
        lines += ["", "Notes:"] + ["- " + n for n in notes]
    return "\n".join(lines)


def _ratio_cell(figure):
    text = "%.2fx (%+.3f ms)" % (figure["ratio"], figure["excess_ms"])
    rounds = figure.get("round_ratios")
    return text + ("; rounds %.2f-%.2fx" % (min(rounds), max(rounds)) if rounds else "")


def _threads(results, name):
    values = sorted({e["summary"][name]["threads"] for e in results if "threads" in e["summary"][name]})
    return "/".join(map(str, values)) or "n/a"


def _throughput_lines(throughput, settings, notes):
    if not throughput:
        return []
    lines = ["", "Two processes, each calling %s in a loop for %g s at the same time (spinners stopped): summed "
             "calls/s, median of the rounds (each round's in brackets)." % (
                 throughput["call"]["label"], throughput["seconds"]), "",
             "| setting | calls/s | rounds |", "|---|---|---|"]
    for setting in settings:
        figure = throughput["settings"][setting.name]
        if "error" in figure:
            lines.append("| %s | n/a | |" % setting.label)
            notes.append("throughput, %s: %s" % (setting.label, figure["error"]))
            continue
        lines.append("| %s | %.0f | %s |" % (setting.label, figure["calls_per_second"],
                                            ", ".join("%.0f" % r for r in figure["rounds"])))
    v = throughput["verdict"]
    if v is not None:
        lines += ["", "Default / num_threads=1: %.2fx (at least %gx: %s)." % (
            v["ratio"], THROUGHPUT_LIMIT, "met" if v["met"] else "NOT met")]
    return lines


# ---------------------------------------------------------------------------------------------------
# The command line


def parse_settings(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError("expected settings among %s, got %r" % (", ".join(BY_NAME), text))
    return [BY_NAME[n] for n in names]


def add_arguments(p):
    p.add_argument("--spinners", type=int, default=None,
                   help="processes spinning meanwhile (default: one per usable core; 0 for a quiet run)")
    p.add_argument("--seconds", type=float, default=1.0,
                   help="timed seconds per worker at least (default 1.0)")
    p.add_argument("--min-calls", type=int, default=300,
                   help="timed calls per setting and call at least, over all rounds (default 300)")
    p.add_argument("--rounds", type=int, default=3, help="workers per setting and call (default 3)")
    p.add_argument("--settings", type=parse_settings, default=None,
                   help="among %s (default: all; the base ones need --base-root)" % ", ".join(BY_NAME))
    p.add_argument("--base-root", help="another built foldnorm checkout, timed as the base settings")
    p.add_argument("--throughput-seconds", type=float, default=3.0,
                   help="seconds of the two-process throughput check per round (default 3; 0 skips it)")
    p.add_argument("--smoke", action="store_true", help="tiny calls: checks that everything runs")
    p.add_argument("--out", help="also write the figures as JSON to this file")


def parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks under-load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--worker", choices=sorted(BY_NAME), help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--throughput", action="store_true", help=argparse.SUPPRESS)
    return p


def _problem(args):
    """What is wrong with the arguments, in one line, or None."""
    if args.spinners is not None and args.spinners < 0:
        return "--spinners must be >= 0, got %d" % args.spinners
    if args.rounds < 1 or args.min_calls < 1:
        return "--rounds and --min-calls must be >= 1"
    if not args.seconds > 0 or not args.throughput_seconds >= 0:
        return "--seconds must be > 0 and --throughput-seconds >= 0"
    if args.base_root is not None and not os.path.isdir(os.path.join(args.base_root, "foldnorm")):
        return "--base-root must be a foldnorm checkout (a folder holding foldnorm/), got %r" % args.base_root
    if args.settings and args.base_root is None and any(s.base for s in args.settings):
        return "the base settings need --base-root"
    return None


def main(args):
    problem = _problem(args)
    if problem:
        print("under-load: " + problem, file=sys.stderr)
        return 2
    settings = args.settings or [s for s in SETTINGS if args.base_root is not None or not s.base]
    base_root = os.path.abspath(args.base_root) if args.base_root else None
    figures = run(SMOKE_CALLS if args.smoke else CALLS, settings,
                  usable_cores() if args.spinners is None else args.spinners, args.seconds, args.min_calls,
                  args.rounds, SMOKE_THROUGHPUT_CALL if args.smoke else THROUGHPUT_CALL, args.throughput_seconds,
                  base_root)
    print(table(figures))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


def _worker_main(args):
    setting = BY_NAME[args.worker]
    (case,) = cases_from_spec(args.case)
    try:
        if args.throughput:
            result = throughput_worker(setting, case, args.seconds, args.base_root)
        else:
            result = latency_worker(setting, case, args.seconds, args.min_calls, args.base_root)
    except Unavailable as error:
        raise SystemExit(str(error)) from None
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    arguments = parser().parse_args()
    sys.exit(_worker_main(arguments) if arguments.worker else main(arguments))
