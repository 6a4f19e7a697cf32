"""Synchronized batch norm across processes: time per training step at a fixed batch per rank, bytes
exchanged, and what the exchange costs on many ranks.

    python -m benchmarks distributed [--shape 16,64,28,28] [--dtype float32] [--ranks 1,2] [--repeat 30]
    python benchmarks/distributed.py ...   (the same)

launches `mpiexec -n P` of itself for each P in --ranks (the mpich wheel's mpiexec beside this Python, else
one on PATH), with the caller's environment (default settings: every rank takes its share of the cores), and
prints a Markdown report: per rank count, the median step time (forward sync_batch_norm_train + backward
sync_batch_norm_backward, each step timed from a barrier to the slowest rank's end) with default threads and
with one thread, its parts, the same step of foldnorm's single-process kernels on one rank's batch (one
thread, and the rank's share of the cores), the ratios of the step's CPU time to the kernels', the bytes
each rank sends and receives per step, a fit of the allgather's latency and bandwidth on this machine, and
the cost model of the exchange for many ranks. Needs the `mpi` extra (mpi4py, mpich).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# Assumed interconnects for the many-rank model (typical one-way small-message latency, bandwidth).
LINKS = [("InfiniBand HDR", 2e-6, 20e9), ("100 GbE", 10e-6, 10e9), ("10 GbE TCP", 30e-6, 1.1e9)]
MODEL_RANKS = [2, 8, 64, 512, 4096]
ALLGATHER_SIZES = [1, 129, 1025, 16385, 131073]  # float64 values per rank (129 = a row, 1 + 2C at C = 64)


def _median_ms(samples):
    return 1e3 * statistics.median(samples)


def worker(args):
    """One rank: time the steps, gather every rank's samples to rank 0, which writes the JSON."""
    from mpi4py import MPI

    import foldnorm
    from foldnorm import distributed
    from foldnorm.distributed import sync

    comm = MPI.COMM_WORLD
    shape = tuple(args.shape)
    channels = shape[1]
    rng = np.random.default_rng(comm.rank)
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(args.dtype)
    dy = rng.standard_normal(shape).astype(args.dtype)
    weight, bias = rng.standard_normal(channels) + 1.0, rng.standard_normal(channels)
    running_mean, running_var = np.zeros(channels), np.ones(channels)
    share = distributed.shard_threads(None, x.size)

    def step(threads=None):
        y, mean, invstd = distributed.sync_batch_norm_train(x, weight, bias, comm, running_mean=running_mean,
                                                            running_var=running_var, num_threads=threads)
        distributed.sync_batch_norm_backward(dy, x, mean, invstd, weight, comm, num_threads=threads)
        return mean, invstd

    def timed_alternately(runs, repeat):
        """name -> (wall seconds, CPU seconds of this process) of each repetition of each run, the runs taking
        turns repetition by repetition, so that a change in the machine's load weighs on all of them alike."""
        samples = {name: [] for name in runs}
        for _ in range(3):
            for run in runs.values():
                run()
        for _ in range(repeat):
            for name, run in runs.items():
                comm.Barrier()
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                samples[name].append((time.perf_counter() - start, time.process_time() - start_cpu))
        return samples

    mean, invstd = step()
    sums = distributed.local_grad_sums(dy, x, mean)
    row = np.concatenate([[x.size // channels], mean, invstd])  # any summary row of the right size
    forward = (None, (channels, 1e-5, 0.1), row, lambda: None)
    backward = (None, (channels, 0), row, lambda: None)

    def exchanges():
        # What sync_batch_norm_train and sync_batch_norm_backward exchange, the same way.
        sync._exchange(comm, lambda: forward, sync._FORWARD_AGREED)
        sync._exchange(comm, lambda: backward, sync._BACKWARD_AGREED)

    total = distributed.merge_grad_sums([sums] * comm.size)
    # The one-thread runs take turns among themselves, after the others: the process's CPU time (and the core
    # they run on) would count the thread team's workers of a run before still spinning after its call
    # (foldnorm's pool spins a while before it sleeps), which a short run between them does not outlast.
    parts = timed_alternately({
        "step": step,
        "kernels, the rank's share of the cores": lambda: _kernel_step(foldnorm, x, dy, weight, bias, share),
        "local statistics": lambda: distributed.local_stats(x),
        "normalize": lambda: distributed.normalize(x, mean, invstd, weight, bias),
        "local gradient sums": lambda: distributed.local_grad_sums(dy, x, mean),
        "normalize backward": lambda: distributed.normalize_backward(dy, x, mean, invstd, weight, total),
        "exchanges (forward and backward)": exchanges,
    }, args.repeat)
    parts.update(timed_alternately({
        "step, 1 thread": lambda: step(1),
        "kernels, 1 thread": lambda: _kernel_step(foldnorm, x, dy, weight, bias, 1),
    }, args.repeat))
    allgather = {k: [wall for wall, _ in samples] for k, samples in timed_alternately(
        {k: (lambda k=k: comm.Allgather(np.zeros(k), np.empty((comm.size, k)))) for k in ALLGATHER_SIZES},
        args.allgather_repeat).items()}
    sent = 8 * values_per_step(channels)
    gathered = comm.gather({"parts": parts, "allgather": allgather, "sent": sent}, root=0)
    if comm.rank == 0:
        # A step lasts until its slowest rank is done: per repetition, the maximum over the ranks.
        # The CPU time is the busiest rank's: on a loaded machine the wall time also counts the time a rank
        # waited for a core.
        def slowest(key, table="parts", field=None):
            samples = (g[table][key] for g in gathered)
            if field is not None:
                samples = ([sample[field] for sample in rank_samples] for rank_samples in samples)
            return [max(s) for s in zip(*samples)]

        result = {
            "ranks": comm.size, "shape": list(shape), "dtype": args.dtype,
            "parts_ms": {key: _median_ms(slowest(key, field=0)) for key in parts},
            "parts_min_ms": {key: 1e3 * min(slowest(key, field=0)) for key in parts},
            "parts_cpu_ms": {key: _median_ms(slowest(key, field=1)) for key in parts},
            "allgather_us": {str(k): 1e6 * statistics.median(slowest(k, "allgather")) for k in ALLGATHER_SIZES},
            "allgather_min_us": {str(k): 1e6 * min(slowest(k, "allgather")) for k in ALLGATHER_SIZES},
            "sent_bytes": sent, "received_bytes": sent * (comm.size - 1),
            "float64_values_sent": values_per_step(channels),
            "threads_per_rank": share, "usable_cores": len(os.sched_getaffinity(0)),
            "ranks_on_this_node": distributed.ranks_on_this_node(),
        }
        with open(args.json, "w") as f:
            json.dump(result, f)


def _kernel_step(foldnorm, x, dy, weight, bias, threads):
    # With running statistics to update, as the synchronized step has.
    channels = x.shape[1]
    y, mean, invstd = foldnorm.batch_norm_train(x, weight, bias, running_mean=np.zeros(channels),
                                                running_var=np.ones(channels), num_threads=threads)
    foldnorm.batch_norm_backward(dy, x, mean, invstd, weight, num_threads=threads)


def values_per_step(channels):
    """float64 values each rank sends per step: per pass a header (failed or not, then the values ranks must
    agree on: C, eps and momentum forward, C and a checksum of the statistics backward), then the rank's row
    (its count and the 2C per-channel summaries)."""
    return (2 + 3 + 2 * channels) + (2 + 2 + 2 * channels)


def fit_latency_bandwidth(allgather_us, ranks):
    """(latency of one message round in s, bandwidth in bytes/s) that make the model below reproduce the
    measured Allgathers: the smallest k's time is ceil(log2 P) rounds, and the largest k adds the (P - 1)
    payloads each rank receives."""
    sizes = sorted(allgather_us, key=int)
    small, large = allgather_us[sizes[0]] * 1e-6, allgather_us[sizes[-1]] * 1e-6
    extra_bytes = (ranks - 1) * 8.0 * (int(sizes[-1]) - int(sizes[0]))
    return small / np.ceil(np.log2(ranks)), (extra_bytes / (large - small) if large > small else float("inf"))


def exchange_model(ranks, channels, latency, bandwidth):
    """Seconds per step of the exchange: per pass two Allgathers of float64 buffers (a header, then the
    summaries), each about ceil(log2 P) rounds of latency for small messages; every rank then receives the
    other (P - 1) ranks' values_per_step values."""
    rounds = 2 * 2 * np.ceil(np.log2(ranks))
    return rounds * latency + (ranks - 1) * 8.0 * values_per_step(channels) / bandwidth


def report(results):
    lines = []
    first = results[0]
    shape = "x".join(map(str, first["shape"]))
    channels = first["shape"][1]
    lines.append("Per-rank batch %s %s (C = %d), median of the repetitions, each timed from a barrier to its "
                 "slowest rank's end (wall), and the CPU time of the busiest rank; the step and its parts are "
                 "timed in turns." % (shape, first["dtype"], channels))
    lines.append("")
    columns = ["%d rank%s" % (r["ranks"], "" if r["ranks"] == 1 else "s") for r in results]
    lines.append("| ms: wall median (min) / CPU median | " + " | ".join(columns) + " |")
    lines.append("|---|" + "--:|" * len(results))
    for key in first["parts_ms"]:
        label = "**step: forward + backward**" if key == "step" else key
        lines.append("| %s | %s |" % (label, " | ".join(
            "%.2f (%.2f) / %.2f" % (r["parts_ms"][key], r["parts_min_ms"][key], r["parts_cpu_ms"][key])
            for r in results)))
    lines.append("| default threads per rank (usable cores / ranks on this machine) | %s |" % " | ".join(
        "%d (%d / %d)" % (r["threads_per_rank"], r["usable_cores"], r["ranks_on_this_node"]) for r in results))
    lines.append("| **CPU: step at 1 thread / kernels at 1 thread** | %s |" % " | ".join(
        "%.2fx" % (r["parts_cpu_ms"]["step, 1 thread"] / r["parts_cpu_ms"]["kernels, 1 thread"]) for r in results))
    for base, label in (("step", "the first column's step"),
                        ("step, 1 thread", "the first column's step at 1 thread")):
        lines.append("| **wall: step / %s** | %s |" % (label, " | ".join(
            "%.2fx (min %.2fx)" % (r["parts_ms"]["step"] / first["parts_ms"][base],
                                   r["parts_min_ms"]["step"] / first["parts_min_ms"][base]) for r in results)))
    lines.append("| bytes sent per rank per step | %s |" % " | ".join(str(r["sent_bytes"]) for r in results))
    lines.append("| bytes received per rank per step | %s |" % " | ".join(str(r["received_bytes"]) for r in results))
    lines.append("| float64 values sent per rank per step | %s |" % " | ".join(
        "%d (%d B)" % (r["float64_values_sent"], 8 * r["float64_values_sent"]) for r in results))
    lines.append("")
    multi = [r for r in results if r["ranks"] > 1]
    if multi:
        r = multi[-1]
        # The fastest repetitions: what the exchange costs when no other process takes the cores.
        latency, bandwidth = fit_latency_bandwidth(r["allgather_min_us"], r["ranks"])
        measured = ", ".join("k=%s: %.1f (%.1f)" % (k, v, r["allgather_min_us"][k])
                             for k, v in r["allgather_us"].items())
        lines.append("mpi4py Allgather of k float64 per rank, %d ranks on this machine, us median (min): %s. From "
                     "the minima: latency %.1f us per message round, bandwidth %.2f GB/s (what the largest k "
                     "adds)." % (r["ranks"], measured, latency * 1e6, bandwidth / 1e9))
        lines.append("")
        links = [("this machine (fit)", latency, bandwidth)] + LINKS
        lines.append("Exchange per step (model, ms) = 4 ceil(log2 P) x latency + (P - 1) x 8(4C + 9) B / "
                     "bandwidth, C = %d:" % channels)
        lines.append("")
        lines.append("| link (latency, bandwidth) | " + " | ".join("P = %d" % p for p in MODEL_RANKS) + " |")
        lines.append("|---|" + "--:|" * len(MODEL_RANKS))
        for name, lat, bw in links:
            lines.append("| %s (%.0f us, %.1f GB/s) | %s |" % (name, lat * 1e6, bw / 1e9, " | ".join(
                "%.3f" % (1e3 * exchange_model(p, channels, lat, bw)) for p in MODEL_RANKS)))
    return "\n".join(lines)


def mpiexec_path():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def launch(args):
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/distributed.py: mpi4py is not installed (pip install 'foldnorm[mpi]')")
    mpiexec = mpiexec_path()
    if mpiexec is None:
        sys.exit("benchmarks/distributed.py: no mpiexec beside this Python or on PATH (pip install mpich)")
    results = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            out = os.path.join(tmp, "ranks%d.json" % ranks)
            command = [mpiexec, "-n", str(ranks), sys.executable, os.path.abspath(__file__), "--worker", "--json",
                       out, "--shape", ",".join(map(str, args.shape)), "--dtype", args.dtype,
                       "--repeat", str(args.repeat), "--allgather-repeat", str(args.allgather_repeat)]
            print("running: %s" % " ".join(command[:3] + ["python", "benchmarks/distributed.py", "..."]),
                  file=sys.stderr)
            subprocess.run(command, check=True)
            with open(out) as f:
                results.append(json.load(f))
    print(report(results))
    print("\n%d cores usable; load average %.1f before the runs, %.1f after." % (
        len(os.sched_getaffinity(0)), load_before, os.getloadavg()[0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def add_arguments(parser):
    parser.add_argument("--shape", type=lambda s: [int(v) for v in s.split(",")], default=[16, 64, 28, 28],
                        help="one rank's batch, N,C,H,W (default 16,64,28,28)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--ranks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--allgather-repeat", type=int, default=200, help="repetitions of each allgather size")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--worker", action="store_true",
                        help="be one rank (under your own mpiexec, e.g. with a hostfile); rank 0 writes --json")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="print the report of saved --json files")


def run(args):
    if args.report:
        results = []
        for path in args.report:
            with open(path) as f:
                loaded = json.load(f)  # one --worker run, or the list a launch writes
            results.extend(loaded if isinstance(loaded, list) else [loaded])
        print(report(sorted(results, key=lambda r: r["ranks"])))
    elif args.worker:
        if not args.json:
            sys.exit("benchmarks/distributed.py: --worker needs --json FILE")
        worker(args)
    else:
        launch(args)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
