"""Latency of batch_norm_train on a busy machine: foldnorm beside torch, with other processes spinning.

    python -m benchmarks under-load [--spinners 2] [--seconds 1.5] [--rounds 3] [--shapes 256x64,...]

`--spinners` processes (`while True: pass`) run for the whole measurement, so the machine has more runnable
threads than cores, as on a shared box or under a data loader.  Each contender (foldnorm's
`batch_norm_train`, torch's `F.batch_norm(training=True)`) runs in a fresh process of its own, with its
default thread count, calling the kernel back to back for `--seconds` after a warm-up and timing every
call.  The contenders alternate for `--rounds` rounds (each round starting with a different one), and
every latency of a contender is pooled before p50, p99 and the mean are taken.  The verdict: foldnorm's
mean and p99 each at most TARGET_RATIO times torch's.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

SHAPES = ((256, 64), (32, 512, 7, 7), (64, 128, 14, 14))
CONTENDERS = ("foldnorm", "torch")
TARGET_RATIO = 2.0
WARMUP_CALLS = 50


def parse_shapes(text):
    try:
        shapes = tuple(tuple(int(d) for d in s.split("x")) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected shapes like 256x64,32x512x7x7, got %r" % text) from None
    if not shapes or any(len(s) < 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError("expected shapes like 256x64,32x512x7x7, got %r" % text)
    return shapes


def shape_label(shape):
    return "(%s)" % ", ".join(map(str, shape))


# ---------------------------------------------------------------------------------------------------
# The worker: one contender, one shape, in a process of its own


def _kernel(contender, shape):
    """(call, threads): call() runs the contender's training forward once on seeded float32 data."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
    bias = rng.standard_normal(shape[1]).astype(np.float32)
    if contender == "foldnorm":
        import foldnorm

        return (lambda: foldnorm.batch_norm_train(x, weight, bias)), foldnorm.get_num_threads()
    import torch
    import torch.nn.functional as F

    tx, tw, tb = (torch.from_numpy(a) for a in (x, weight, bias))

    def call():
        with torch.no_grad():
            return F.batch_norm(tx, None, None, tw, tb, training=True)

    return call, torch.get_num_threads()


def worker(contender, shape, seconds):
    """Latencies (seconds) of back-to-back calls for `seconds`, after WARMUP_CALLS untimed ones."""
    call, threads = _kernel(contender, shape)
    for _ in range(WARMUP_CALLS):
        call()
    clock = time.perf_counter
    latencies = []
    end = clock() + seconds
    while True:
        start = clock()
        call()
        stop = clock()
        latencies.append(stop - start)
        if stop >= end:
            break
    return {"contender": contender, "shape": list(shape), "threads": threads, "latencies": latencies}


# ---------------------------------------------------------------------------------------------------
# The driver: spinners, alternating workers, statistics, verdicts


def start_spinners(count):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_spinners(spinners):
    for spinner in spinners:
        spinner.kill()
    for spinner in spinners:
        spinner.wait()


def run_worker(contender, shape, seconds):
    """The worker's result, run in a fresh interpreter; None (with a note) when the contender is absent."""
    command = [sys.executable, "-m", "benchmarks.under_load", "--worker", contender,
               "--shapes", "x".join(map(str, shape)), "--seconds", repr(seconds)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"contender": contender, "error": lines[-1] if lines else "exit %d" % done.returncode}
    return json.loads(done.stdout)


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


def measure_shape(shape, seconds, rounds):
    """{contender: summary with threads, or error} for one shape, the contenders alternating by round."""
    pooled = {c: [] for c in CONTENDERS}
    threads = {}
    errors = {}
    for round_index in range(rounds):
        shift = round_index % len(CONTENDERS)
        for contender in CONTENDERS[shift:] + CONTENDERS[:shift]:
            if contender in errors:
                continue
            result = run_worker(contender, shape, seconds)
            if "error" in result:
                errors[contender] = result["error"]
                continue
            pooled[contender].extend(result["latencies"])
            threads[contender] = result["threads"]
    summary = {}
    for contender in CONTENDERS:
        if contender in errors:
            summary[contender] = {"error": errors[contender]}
        else:
            summary[contender] = dict(summarize(pooled[contender]), threads=threads[contender])
    return summary


def verdict(summary):
    """foldnorm's mean and p99 over torch's, and whether both are within TARGET_RATIO (None without torch)."""
    ours, theirs = summary.get("foldnorm", {}), summary.get("torch", {})
    if "mean_ms" not in ours or "mean_ms" not in theirs:
        return None
    ratios = {"mean": ours["mean_ms"] / theirs["mean_ms"], "p99": ours["p99_ms"] / theirs["p99_ms"]}
    return dict(ratios, met=all(r <= TARGET_RATIO for r in ratios.values()))


def table(results, spinners):
    lines = ["batch_norm_train, float32, default threads, %d spinning process%s; latency in ms"
             % (spinners, "" if spinners == 1 else "es"), "",
             "| shape | contender | default threads | p50 | p99 | mean | calls |", "|---|---|---|---|---|---|---|"]
    notes = []
    for entry in results:
        label = shape_label(entry["shape"])
        for contender in CONTENDERS:
            s = entry["summary"][contender]
            if "error" in s:
                lines.append("| %s | %s | n/a | n/a | n/a | n/a | 0 |" % (label, contender))
                notes.append("%s %s: %s" % (label, contender, s["error"]))
                continue
            lines.append("| %s | %s | %d | %.3f | %.3f | %.3f | %d |" % (
                label, contender, s["threads"], s["p50_ms"], s["p99_ms"], s["mean_ms"], s["calls"]))
    lines += ["", "| shape | mean foldnorm/torch | p99 foldnorm/torch | within %gx |" % TARGET_RATIO,
              "|---|---|---|---|"]
    for entry in results:
        v = entry["verdict"]
        if v is None:
            lines.append("| %s | n/a | n/a | n/a |" % shape_label(entry["shape"]))
        else:
            lines.append("| %s | %.3g | %.3g | %s |" % (shape_label(entry["shape"]), v["mean"], v["p99"],
                                                        "yes" if v["met"] else "NO"))
    return "\n".join(lines + [""] + notes)


def run(shapes, spinners, seconds, rounds):
    spinning = start_spinners(spinners)
    try:
        results = []
        for shape in shapes:
            print("under load: %s" % shape_label(shape), file=sys.stderr, flush=True)
            summary = measure_shape(shape, seconds, rounds)
            results.append({"shape": list(shape), "summary": summary, "verdict": verdict(summary)})
    finally:
        stop_spinners(spinning)
    return results


def parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks under-load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    return p


def add_arguments(p):
    p.add_argument("--spinners", type=int, default=2, help="processes spinning meanwhile (default 2)")
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per worker (default 1.5)")
    p.add_argument("--rounds", type=int, default=3, help="workers per contender and shape (default 3)")
    p.add_argument("--shapes", type=parse_shapes, default=SHAPES,
                   help="shapes like 256x64,32x512x7x7 (default: %s)"
                   % ",".join("x".join(map(str, s)) for s in SHAPES))
    p.add_argument("--out", help="also write the figures as JSON to this file")


def main(args):
    if args.spinners < 0 or args.rounds < 1 or not args.seconds > 0:
        print("under-load: --spinners must be >= 0, --rounds >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    results = run(args.shapes, args.spinners, args.seconds, args.rounds)
    print(table(results, args.spinners))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"spinners": args.spinners, "seconds": args.seconds, "rounds": args.rounds,
                       "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else os.cpu_count(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    arguments = parser().parse_args()
    if arguments.worker:
        json.dump(worker(arguments.worker, arguments.shapes[0], arguments.seconds), sys.stdout)
        sys.exit(0)
    sys.exit(main(arguments))
