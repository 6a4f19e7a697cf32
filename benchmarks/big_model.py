"""Big models: `foldnorm fold` on a model of hundreds of megabytes kept in external data, beside
onnxruntime's own optimizer writing its optimized model of the same file, measured in the same run.

The model is generated: `pairs` Conv (channels -> channels, 3x3, with bias) + BatchNormalization + Relu
blocks, seeded random weights, saved with every tensor in one external data file. Each command runs as
a separate process, started from a small wrapper process that reports the command's wall time, its user
and system CPU time and page faults (its processes together, resource.getrusage(RUSAGE_CHILDREN)), and the
peak of the resident memory of all its processes together (the command and the verifying process it
starts, sampled from /proc every 10 ms), so Python's start-up and imports count, as they do for a user.
Contenders are interleaved round by round; the median of the rounds is reported, and each time against
onnxruntime's is the median of the ratios taken round by round.

    python -m benchmarks big [--megabytes 300] [--rounds 5] [--huge] [--only NAMES] [--root DIR] [--out DIR]

--root runs the foldnorm of another source tree (a checkout of an earlier commit: before and after).

--huge adds one round of a model past protobuf's 2 GiB limit (folded with and without verification).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import onnx

OPSET = 13
KERNEL = 3
SPATIAL = 4
MIB = 2**20
# Past protobuf's 2 GiB limit, as 16 blocks of about 150 MB.
HUGE_MEGABYTES = 2400.0
HUGE_PAIRS = 16

# Runs `argv` in a child process; prints {"seconds", "peak_bytes" (all its processes together),
# "largest_process_bytes", "user_seconds", "system_seconds", "minor_faults", "major_faults", "returncode",
# "stderr"} as JSON.
_WRAPPER = r"""
import json, os, resource, subprocess, sys, tempfile, threading, time

def tree_rss(pid):
    total, pids = 0, [pid]
    while pids:
        p = pids.pop()
        try:
            with open("/proc/%d/statm" % p) as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                pids += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total

start = time.perf_counter()
err = tempfile.TemporaryFile()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=err)
peak = 0
while child.poll() is None:
    peak = max(peak, tree_rss(child.pid))
    time.sleep(0.01)
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
err.seek(0)
print(json.dumps({"seconds": seconds, "peak_bytes": max(peak, usage.ru_maxrss * 1024),
                  "largest_process_bytes": usage.ru_maxrss * 1024, "user_seconds": usage.ru_utime,
                  "system_seconds": usage.ru_stime, "minor_faults": usage.ru_minflt, "major_faults": usage.ru_majflt,
                  "returncode": child.returncode, "stderr": err.read().decode(errors="replace")[-2000:]}))
"""

# onnxruntime's optimizer at basic level, writing its optimized model (external data past 2 GiB).
_ORT_OPTIMIZE = r"""
import sys
import onnxruntime as ort
source, target, external = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
options.optimized_model_filepath = target
options.log_severity_level = 3
if external:
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     target.rsplit("/", 1)[-1] + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
"""


def channels_for(megabytes, pairs):
    """The channel count whose `pairs` Conv weights (channels x channels x 3 x 3 float32) are about
    `megabytes` MB in all."""
    per_pair = megabytes * 1e6 / pairs / (KERNEL * KERNEL * 4)
    return max(8, int(round(per_pair**0.5)))


def write_conv_bn_model(path, *, channels, pairs, seed=0):
    """Write the model (every tensor of 1 KiB or more in `<path>.data`, as onnx.save_model writes it for a
    user) and return the bytes of its tensors."""
    from foldnorm.fold.builder import ModelBuilder

    builder = ModelBuilder(seed=seed)
    x = builder.input("input", [1, channels, SPATIAL, SPATIAL])
    for i in range(pairs):
        y = builder.conv(x, channels, channels, KERNEL, bias=True, name="conv%d" % i)
        x = builder.relu(builder.frozen_batch_norm(y, channels, name="bn%d" % i))
    builder.output(x, [1, channels, SPATIAL, SPATIAL])
    model = builder.model(opset=OPSET, producer="foldnorm-benchmark")
    del builder  # its own list of the weights
    tensor_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=1024)
    return tensor_bytes


def measure_command(argv, root=None):
    """The figures of _WRAPPER for one run of `argv` in a fresh process (foldnorm imported from `root`)."""
    environment = None
    if root is not None:
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in os.environ.get(
            "PYTHONPATH", "").split(os.pathsep) if p]))
    # From the root's folder: `python -m` imports from the current folder first.
    done = subprocess.run([sys.executable, "-c", _WRAPPER] + list(argv), capture_output=True, text=True,
                          check=True, env=environment, cwd=root)
    return json.loads(done.stdout)


def commands(model_path, folder, huge=False):
    """{contender: argv} for the foldnorm command with and without verification and onnxruntime's optimizer."""
    foldnorm = [sys.executable, "-m", "foldnorm.cli", "fold", str(model_path)]
    return {
        "onnxruntime_optimizer": [sys.executable, "-c", _ORT_OPTIMIZE, str(model_path),
                                  os.path.join(folder, "ort_optimized.onnx"), "1" if huge else "0"],
        "foldnorm_no_verify": foldnorm + ["-o", os.path.join(folder, "folded_nv.onnx"), "--no-verify"],
        "foldnorm_verify": foldnorm + ["-o", os.path.join(folder, "folded.onnx")],
    }


def run_case(megabytes, pairs, rounds, folder, huge=False, only=None, root=None):
    """Generate the model, time each contender `rounds` times (interleaved); returns the JSON-ready case."""
    channels = channels_for(megabytes, pairs)
    model_path = os.path.join(folder, "model.onnx")
    start = time.perf_counter()
    tensor_bytes = write_conv_bn_model(model_path, channels=channels, pairs=pairs)
    model_bytes = os.path.getsize(model_path) + os.path.getsize(model_path + ".data")
    case = {"pairs": pairs, "channels": channels, "model_bytes": model_bytes, "tensor_bytes": tensor_bytes,
            "generate_seconds": time.perf_counter() - start, "rounds": rounds,
            "memory_budget_bytes": 2 * model_bytes + 300 * MIB, "contenders": {}, "failures": []}
    argvs = commands(model_path, folder, huge)
    if only:
        argvs = {name: argv for name, argv in argvs.items() if name in only}
    samples = {name: [] for name in argvs}
    for round_index in range(rounds):
        names = list(argvs)
        names = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in names:
            result = measure_command(argvs[name], root)
            result["round"] = round_index
            if result["returncode"] != 0:
                case["failures"].append("%s: exit %d: %s" % (name, result["returncode"], result["stderr"].strip()))
                continue
            samples[name].append(result)
    for name, results in samples.items():
        if results:
            case["contenders"][name] = {
                "seconds_median": statistics.median(r["seconds"] for r in results),
                "seconds_all": [r["seconds"] for r in results],
                "peak_bytes_median": statistics.median(r["peak_bytes"] for r in results),
                "peak_bytes_max": max(r["peak_bytes"] for r in results),
                "largest_process_bytes_max": max(r["largest_process_bytes"] for r in results),
                "user_seconds_median": statistics.median(r["user_seconds"] for r in results),
                "system_seconds_median": statistics.median(r["system_seconds"] for r in results),
                "minor_faults_median": statistics.median(r["minor_faults"] for r in results),
                "major_faults_median": statistics.median(r["major_faults"] for r in results),
            }
    ort_by_round = {r["round"]: r["seconds"] for r in samples.get("onnxruntime_optimizer", [])}
    for name in ("foldnorm_no_verify", "foldnorm_verify"):
        mine = case["contenders"].get(name)
        if mine is None:
            continue
        mine["peak_vs_budget"] = mine["peak_bytes_max"] / case["memory_budget_bytes"]
        # Paired round by round (the machine's load drifts between rounds), then the median.
        ratios = [r["seconds"] / ort_by_round[r["round"]] for r in samples[name] if r["round"] in ort_by_round]
        if ratios:
            mine["time_vs_onnxruntime_by_round"] = ratios
            mine["time_vs_onnxruntime"] = statistics.median(ratios)
    return case


def format_case(label, case):
    lines = ["%s: %d x (Conv %d->%d 3x3 + BatchNormalization + Relu), %.0f MB on disk (external data), "
             "median of %d rounds; memory budget 2 x model + 300 MiB = %.0f MB"
             % (label, case["pairs"], case["channels"], case["channels"], case["model_bytes"] / 1e6,
                case["rounds"], case["memory_budget_bytes"] / 1e6),
             "| command | wall s (median) | user s | system s | minor faults | peak memory MB, all processes (max) "
             "| time / onnxruntime's (median of rounds) | peak / budget |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, figures in case["contenders"].items():
        lines.append("| %s | %.2f | %.2f | %.2f | %.0f | %.0f | %s | %s |" % (
            name, figures["seconds_median"], figures["user_seconds_median"], figures["system_seconds_median"],
            figures["minor_faults_median"], figures["peak_bytes_max"] / 1e6,
            "%.2f" % figures["time_vs_onnxruntime"] if "time_vs_onnxruntime" in figures else "",
            "%.2f" % figures["peak_vs_budget"] if "peak_vs_budget" in figures else ""))
    lines.extend("failed: %s" % failure for failure in case["failures"])
    return "\n".join(lines)


def add_arguments(p):
    p.add_argument("--megabytes", type=float, default=300.0, help="size of the model's weights (default 300)")
    p.add_argument("--pairs", type=int, default=8, help="Conv+BatchNormalization blocks (default 8)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per contender (default 5)")
    p.add_argument("--huge", action="store_true", help="also one round of a model past 2 GiB (2.4 GB)")
    p.add_argument("--only", default=None, help="these contenders only, e.g. onnxruntime_optimizer,"
                   "foldnorm_no_verify (default: all three)")
    p.add_argument("--root", default=None, help="run the foldnorm of this source tree instead of this one")
    p.add_argument("--out", default=None, help="write big_model.json into this folder")


def main(args):
    if not args.megabytes > 0 or args.pairs < 1 or args.rounds < 1:
        print("big: --megabytes must be > 0, --pairs and --rounds >= 1", file=sys.stderr)
        return 2
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    results = {}
    with tempfile.TemporaryDirectory(prefix="foldnorm-bench-") as folder:
        results["big"] = run_case(args.megabytes, args.pairs, args.rounds, folder, only=only, root=args.root)
        print(format_case("big", results["big"]), flush=True)
    if args.huge:
        with tempfile.TemporaryDirectory(prefix="foldnorm-bench-") as folder:
            results["huge"] = run_case(HUGE_MEGABYTES, HUGE_PAIRS, 1, folder, huge=True, only=only, root=args.root)
            print(format_case("huge", results["huge"]), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "big_model.json"), "w") as file:
            json.dump(results, file, indent=2)
    return 0
