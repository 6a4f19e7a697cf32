"""Never slower: every model of the test corpus timed in onnxruntime before and after `foldnorm fold`, beside
onnxruntime's own optimized output.

The corpus: the architectures of tests/fold/architectures.py, each exported by both torch exporters (as
the tests export them; needs torch), and the light models shipped with onnx that hold BatchNormalization
(benchmarks/models.py materializes their weights). Each model is folded as the command folds it by default
(foldnorm.fold_model, verification off: the tests verify), and written by onnxruntime's basic-level
optimizer (its Conv+BatchNormalization fusion among others). The three are timed in onnxruntime's CPU
provider with one intra-op thread, under the default SessionOptions (every graph optimization on) and with
graph optimizations off: each round runs every model `repeat` times in turn (the order rotating round by
round) and keeps each one's best; a ratio is the median over the rounds of the round's ratio, so that the
machine's drift between rounds cancels.

    python -m benchmarks corpus [--rounds 9] [--repeat 5] [--only NAMES] [--out DIR]

The fold is imported from wherever `foldnorm` comes first on sys.path: put an earlier checkout first to time
its folds (before and after a change).
"""
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx

LEVELS = ("default", "disabled")
VARIANTS = ("original", "folded", "onnxruntime")


def corpus_models(folder, only=None):
    """[(name, path, input shape)] of the corpus, written into `folder`."""
    from .models import LIGHT_WITH_BATCH_NORM, materialize_light_model

    models = []
    try:
        from tests.fold.architectures import ARCHITECTURES, EXPORTERS, export
    except ImportError as error:  # torch (or the test tree) is missing: the light models only
        print("corpus: the exported architectures are skipped (%s)" % error, file=sys.stderr)
        ARCHITECTURES, EXPORTERS = {}, ()
    for name in ARCHITECTURES:
        for exporter in EXPORTERS:
            label = "%s_%s" % (name, exporter)
            if only and label not in only:
                continue
            try:
                path, _, shapes = export(name, exporter, folder)
            except Exception as error:  # noqa: BLE001 - an exporter that fails skips its model, said below
                print("corpus: %s not exported (%s)" % (label, str(error).splitlines()[0][:120]), file=sys.stderr)
                continue
            models.append((label, path, tuple(shapes[0])))
    for name in LIGHT_WITH_BATCH_NORM:
        if only and name not in only:
            continue
        model = materialize_light_model(name)
        path = os.path.join(folder, name + ".onnx")
        onnx.save_model(model, path)
        dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
        models.append((name, path, tuple(dims)))
    return models


def variants(path, folder):
    """{variant: path}: the model, foldnorm's fold of it, onnxruntime's basic-level optimization of it."""
    import onnxruntime as ort

    from foldnorm.fold import fold_model

    stem = os.path.splitext(os.path.basename(path))[0]
    folded, report = fold_model(path, verify=False)
    folded_path = os.path.join(folder, stem + ".folded.onnx")
    onnx.save_model(folded, folded_path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = os.path.join(folder, stem + ".ort.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    counts = report.counts()
    return {"original": path, "folded": folded_path, "onnxruntime": options.optimized_model_filepath}, counts


def session(path, level):
    import onnxruntime as ort

    options = ort.SessionOptions()  # the defaults: every graph optimization on
    if level == "disabled":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def time_model(paths, shape, rounds, repeat, seed=0):
    """{level: {variant: [best seconds per round]}} of the variants, interleaved round by round."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    results = {}
    for level in LEVELS:
        sessions = {variant: session(path, level) for variant, path in paths.items()}
        feeds = {variant: {s.get_inputs()[0].name: x} for variant, s in sessions.items()}
        for variant, s in sessions.items():  # warm-up
            s.run(None, feeds[variant])
        samples = {variant: [] for variant in sessions}
        order = list(sessions)
        for round_index in range(rounds):
            turn = order[round_index % len(order):] + order[:round_index % len(order)]
            for variant in turn:
                best = float("inf")
                for _ in range(repeat):
                    start = time.perf_counter()
                    sessions[variant].run(None, feeds[variant])
                    best = min(best, time.perf_counter() - start)
                samples[variant].append(best)
        results[level] = samples
    return results


def ratio(samples, numerator, denominator):
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator]))


def run(rounds, repeat, only=None):
    rows = []
    with tempfile.TemporaryDirectory(prefix="foldnorm-corpus-") as folder:
        for name, path, shape in corpus_models(folder, only):
            paths, counts = variants(path, folder)
            timings = time_model(paths, shape, rounds, repeat)
            row = {"model": name, "shape": list(shape), "counts": counts, "seconds": timings}
            for level in LEVELS:
                row["%s_original_ms" % level] = statistics.median(timings[level]["original"]) * 1e3
                row["%s_folded_vs_original" % level] = ratio(timings[level], "folded", "original")
                row["%s_onnxruntime_vs_original" % level] = ratio(timings[level], "onnxruntime", "original")
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = ("| model | BN folded / rewritten / left | original ms (default) | folded / original (default) | "
          "onnxruntime's / original (default) | original ms (optimizations off) | folded / original (off) | "
          "onnxruntime's / original (off) |\n|---|---|---:|---:|---:|---:|---:|---:|")


def format_row(row):
    counts = row["counts"]
    return "| %s | %d / %d / %d | %.2f | %.3f | %.3f | %.2f | %.3f | %.3f |" % (
        row["model"], sum(counts["folded"].values()), counts["rewritten"], counts["left"],
        row["default_original_ms"], row["default_folded_vs_original"], row["default_onnxruntime_vs_original"],
        row["disabled_original_ms"], row["disabled_folded_vs_original"], row["disabled_onnxruntime_vs_original"])


def add_arguments(p):
    p.add_argument("--rounds", type=int, default=9, help="rounds per model (default 9)")
    p.add_argument("--repeat", type=int, default=5, help="runs per model per round, the best kept (default 5)")
    p.add_argument("--only", default=None, help="these models only, e.g. densenet_torchscript,light_densenet121")
    p.add_argument("--out", default=None, help="write corpus.json into this folder")


def main(args):
    if args.rounds < 1 or args.repeat < 1:
        print("corpus: --rounds and --repeat must be >= 1", file=sys.stderr)
        return 2
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    print(HEADER, flush=True)
    rows = run(args.rounds, args.repeat, only)
    slowest = max(rows, key=lambda r: max(r["default_folded_vs_original"], r["disabled_folded_vs_original"]),
                  default=None)
    if slowest is not None:
        print("slowest folded model against its original: %s, %.3f (default), %.3f (optimizations off)" % (
            slowest["model"], slowest["default_folded_vs_original"], slowest["disabled_folded_vs_original"]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "corpus.json"), "w") as file:
            json.dump(rows, file, indent=2)
    return 0
