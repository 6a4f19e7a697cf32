"""The run's outputs: the Markdown table, the targets verdicts, the flat figures `compare` reads, the plots."""
import json
import os

from . import cache_memory
from .machine import banner, caches_text
from .kernels import BATCH_NORM_HEADLINE, GROUP_NORM_HEADLINE, LAYER_NORM_HEADLINE, KernelCase

SCHEMA = 1


def _headline_key(kernel, shape, groups=0):
    return KernelCase(kernel, shape, groups=groups).key


# The kernels' performance targets. "x_copy": foldnorm's time over the copy's, at all cores (at most `limit`);
# "vs": the other's time over foldnorm's (at least `limit`); "scaling": 1-thread time over 2-thread time.
TARGETS = [
    ("x_copy", _headline_key("batch_norm", BATCH_NORM_HEADLINE), None, 1.1),
    ("x_copy", _headline_key("batch_norm_train", BATCH_NORM_HEADLINE), None, 1.6),
    ("x_copy", _headline_key("batch_norm_backward", BATCH_NORM_HEADLINE), None, 2.5),
    ("vs", _headline_key("layer_norm", LAYER_NORM_HEADLINE), "torch", 1.0),
    ("vs", _headline_key("layer_norm", LAYER_NORM_HEADLINE), "onnxruntime", 1.5),
    ("vs", _headline_key("group_norm", GROUP_NORM_HEADLINE, 32), "torch", 1.0),
    ("vs", _headline_key("group_norm", GROUP_NORM_HEADLINE, 32), "onnxruntime", 1.5),
    ("vs", _headline_key("instance_norm", GROUP_NORM_HEADLINE), "torch", 1.0),
    ("vs", _headline_key("instance_norm", GROUP_NORM_HEADLINE), "onnxruntime", 1.5),
    ("scaling", _headline_key("batch_norm_train", BATCH_NORM_HEADLINE), None, 1.6),
]


def evaluate_targets(kernel_results):
    """One verdict per target from this run's paired ratios: met True/False, or None when not measured."""
    by_key = {r["key"]: r for r in kernel_results}
    verdicts = []
    for kind, key, other, limit in TARGETS:
        if kind == "x_copy":
            text = "%s at all cores <= %.1fx the copy time" % (key, limit)
        elif kind == "vs":
            text = "%s at all cores >= %.1fx %s" % (key, limit, other)
        else:
            text = "%s at 2 threads >= %.1fx 1 thread" % (key, limit)
        verdict = {"target": text, "kind": kind, "key": key, "limit": limit, "measured": None, "met": None}
        verdicts.append(verdict)
        result = by_key.get(key)
        if result is None or "rows" not in result:
            verdict["why"] = result["skipped"] if result else "not in this run"
            continue
        rows = {r["threads"]: r for r in result["rows"]}
        if kind == "scaling" and not {1, 2} <= set(rows):
            verdict["why"] = "needs a run at 1 and 2 threads"
            continue
        row = rows[2] if kind == "scaling" else rows[max(rows)]
        ratio = row["x_copy"] if kind == "x_copy" else row["vs_" + other] if kind == "vs" else row["scaling"]
        if ratio is None:
            verdict["why"] = "no %s figure in this run" % other
            continue
        verdict["measured"] = ratio
        verdict["threads"] = row["threads"]
        if kind == "scaling":
            # What the memory allows: a kernel bound by bandwidth scales no better than the same-size copy.
            verdict["copy_scaling"] = row.get("copy_scaling")
        verdict["met"] = ratio["median"] <= limit if kind == "x_copy" else ratio["median"] >= limit
    return verdicts


def figures(kernel_results, model_results, fold_scaling=None):
    """Flat {name: {"value", "unit"}} of foldnorm's own figures, lower is better: what `compare` compares."""
    flat = {}
    for result in kernel_results:
        for row in result.get("rows", []):
            prefix = "kernel/%s/t%d/" % (result["key"], row["threads"])
            flat[prefix + "seconds"] = {"value": row["foldnorm"]["median"], "unit": "s"}
            flat[prefix + "x_copy"] = {"value": row["x_copy"]["median"], "unit": "ratio"}
    for result in model_results:
        prefix = "model/%s/" % result["name"]
        for name, summary in result.get("latency", {}).items():
            if name.startswith("folded/"):
                flat[prefix + name + "/seconds"] = {"value": summary["median"], "unit": "s"}
        for name, ratio in result.get("ratios", {}).items():
            if name.startswith("folded_vs_original/"):
                flat[prefix + name] = {"value": ratio["median"], "unit": "ratio"}
        if "fold" in result:
            flat[prefix + "fold_seconds"] = {"value": result["fold"]["fold_seconds"], "unit": "s"}
    for row in (fold_scaling or {}).get("rows", []):
        flat["fold_scaling/%d_pairs/seconds" % row["pairs"]] = {"value": row["fold"]["median"], "unit": "s"}
    return flat


HEADLINE_SHAPES = {
    "batch_norm": BATCH_NORM_HEADLINE, "batch_norm_train": BATCH_NORM_HEADLINE,
    "batch_norm_backward": BATCH_NORM_HEADLINE, "layer_norm": LAYER_NORM_HEADLINE,
    "layer_norm_backward": LAYER_NORM_HEADLINE, "rms_norm": LAYER_NORM_HEADLINE,
    "rms_norm_backward": LAYER_NORM_HEADLINE, "group_norm": GROUP_NORM_HEADLINE,
    "group_norm_backward": GROUP_NORM_HEADLINE, "instance_norm": GROUP_NORM_HEADLINE,
    "instance_norm_backward": GROUP_NORM_HEADLINE,
}


def headline(kernels, models):
    """One line per kernel at its headline shape and all cores, one per model: the ratios a summary quotes."""
    rows = []
    for result in kernels:
        if "rows" in result and tuple(result["shape"]) == HEADLINE_SHAPES[result["kernel"]]:
            row = result["rows"][-1]
            rows.append("| %s %s | %d | %.0f%% | %s | %s |" % (
                result["label"], result["shape_label"], row["threads"], 100 * row["roof"]["median"],
                _ratio(row["vs_onnxruntime"]), _ratio(row["vs_torch"])))
    lines = []
    if rows:
        lines += ["#### Headline: kernels at all cores", "",
                  "| kernel | thr | of copy roof | vs onnxruntime | vs torch |", "|---|--:|--:|--:|--:|"] + rows + [""]
    model_rows = [
        "| %s | %s | %s |" % (m["name"], _ratio(m["ratios"].get("folded_vs_original/disabled")),
                             _ratio(m["ratios"].get("folded_vs_original/enabled")))
        for m in models if m.get("ratios", {}).get("folded_vs_original/disabled")
    ]
    if model_rows:
        lines += ["#### Headline: folded / original latency in onnxruntime (below 1: faster)", "",
                  "| model | optimizations off | optimizations on |", "|---|--:|--:|"] + model_rows + [""]
    return lines


def topology_text(topology):
    """`1 socket, 1 NUMA node, 2 cores, 1 thread per core` from machine.topology()."""
    if not topology.get("known"):
        return "%s logical CPUs, topology unknown" % topology.get("logical_cpus", "?")

    def plural(n, word):
        return "%d %s%s" % (n, word, "" if n == 1 else "s")

    return "%s, %s, %s, %s per core" % (
        plural(topology["sockets"], "socket"), plural(topology["numa_nodes"], "NUMA node"),
        plural(topology["physical_cores"], "core"), plural(topology["smt_per_core"], "thread"))


def write_json(results, path):
    with open(path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")


def _ms(seconds):
    return "%.3g" % (seconds * 1e3)


def _ratio(ratio, spread=False):
    if ratio is None:
        return "n/a"
    text = "%.2fx" % ratio["median"]
    if spread:
        text += " (%.2f-%.2f)" % (ratio["min"], ratio["max"])
    return text


def markdown(results):
    machine = results["machine"]
    config = results["config"]
    lines = ["### foldnorm benchmarks: %s run, %s" % (results["mode"], machine["date"]), ""]
    lines += banner(results.get("machine_check") or {"busy": False})
    versions = ", ".join("%s %s" % (k, v) for k, v in machine["versions"].items() if v)
    build = machine["foldnorm_build"]
    copy = ", ".join("%s thr %.1f GB/s" % (t, g) for t, g in machine["copy_gbps"].items())
    load = machine.get("load_average")
    bound = ", ".join("%s=%s" % item for item in machine.get("binding", {}).items() if item[1]) or "none set"
    lines += [
        "Machine: %s, %d usable cores (%s); threads measured: %s; load average at start: %s; OpenMP "
        "binding: %s." % (
            machine["cpu_model"], machine["usable_cores"], topology_text(machine.get("topology", {})),
            ", ".join(map(str, machine["threads"])), " ".join("%.2f" % v for v in load) if load else "n/a", bound),
        "Copy roof (64 MiB multi-threaded memcpy, bytes read + written): %s. Pause after each timed call "
        "(idle workers' spin, doubled): %.1f ms." % (copy, 1e3 * machine.get("settle_seconds", 0.0)),
        "Versions: %s. foldnorm build: OpenMP %s, %s %s%s." % (
            versions, "on" if build["openmp"] else "off", build["compiler"], build["cflags"],
            "; vector path %s (built: %s)" % (build["vector_path"], build.get("vector_paths"))
            if "vector_path" in build else ""),
    ]
    if "caches" in machine:  # runs before the caches were recorded have no line for them
        lines.append("Caches: %s." % caches_text(machine["caches"]))
    lines.append("")
    kernels = results["kernels"]
    lines += headline(kernels, results["models"])
    if kernels:
        lines += [
            "#### Kernels (float32; median of %d runs after warm-up, contenders interleaved)" % config["repeats"],
            "",
            "GB/s counts the bytes the kernel must move (see the byte model); of roof = copy time / kernel "
            "time; x copy = kernel time / copy time; vs X = X's time / foldnorm's time (above 1: foldnorm "
            "is faster); x %(t)d thr = %(t)d-thread time / this time; eff vs copy = that speed-up / the "
            "same-size copy's (1.00: the kernel scales as well as the memory lets it). Every ratio is a median "
            "of per-round pairs." % {"t": min(machine["threads"])},
            "",
            "| kernel | shape | thr | foldnorm ms (min-max) | GB/s | copy GB/s | of roof | x copy | vs ORT | "
            "vs torch | vs NumPy f64 | x %d thr | eff vs copy |" % min(machine["threads"]),
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for result in kernels:
            if "rows" not in result:
                lines.append("| %s | %s | | skipped: %s | | | | | | | | | |" % (
                    result["label"], result["shape_label"], result["skipped"]))
                continue
            for row in result["rows"]:
                timing = row["foldnorm"]
                lines.append("| %s | %s | %d | %s (%s-%s) | %.1f | %.1f | %s | %s | %s | %s | %s | %s | %s |" % (
                    result["label"], result["shape_label"], row["threads"], _ms(timing["median"]),
                    _ms(timing["min"]), _ms(timing["max"]), row["gbps"], row["copy_gbps"],
                    "%.0f%%" % (100 * row["roof"]["median"]), _ratio(row["x_copy"]), _ratio(row["vs_onnxruntime"]),
                    _ratio(row["vs_torch"]), _ratio(row["vs_numpy"]), _ratio(row["scaling"]),
                    _ratio(row.get("efficiency")).rstrip("x")))
        lines.append("")
    if results.get("cache_memory"):
        lines += cache_memory.markdown(results["cache_memory"])
    if results["targets"]:
        lines += ["#### Targets, from this run's own numbers", "",
                  "| target | measured (min-max) | verdict |",
                  "|---|---|---|"]
        for verdict in results["targets"]:
            state = {True: "met", False: "**not met**", None: "not measured"}[verdict["met"]]
            measured = _ratio(verdict["measured"], spread=True) if verdict["measured"] else verdict.get("why", "")
            if verdict.get("copy_scaling"):
                measured += "; the same-size copy: %s" % _ratio(verdict["copy_scaling"])
            lines.append("| %s | %s | %s |" % (verdict["target"], measured, state))
        lines.append("")
    models = results["models"]
    if models:
        lines += [
            "#### Models (onnxruntime, %d threads; median ms of %d runs; graph optimizations off / on)" % (
                max(machine["threads"]), config["model_repeats"]),
            "",
            "vs original = this variant's latency / the original's at the same optimization level, paired "
            "per round (below 1: faster).",
            "",
            "| model | variant | BN nodes | params MB | session ms off / on | latency ms off | latency ms on | "
            "vs original off | vs original on |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for result in models:
            if "latency" not in result:
                lines.append("| %s | skipped: %s | | | | | | | |" % (result["name"], result.get("skipped", "")))
                continue
            for variant, facts in result["variants"].items():
                cells = []
                for level in ("disabled", "enabled"):
                    timing = result["latency"].get("%s/%s" % (variant, level))
                    cells.append("%s (%s-%s)" % tuple(_ms(timing[k]) for k in ("median", "min", "max"))
                                 if timing else "n/a")
                sessions = " / ".join(_ms(facts[k]) if k in facts else "n/a"
                                      for k in ("session_seconds_disabled", "session_seconds_enabled"))
                ratios = ["-" if variant == "original" else
                          _ratio(result["ratios"].get("%s_vs_original/%s" % (variant, level)))
                          for level in ("disabled", "enabled")]
                lines.append("| %s | %s | %d | %.2f | %s | %s | %s | %s | %s |" % (
                    result["name"], variant, facts["batch_norm_nodes"], facts["param_bytes"] / 1e6, sessions,
                    cells[0], cells[1], ratios[0], ratios[1]))
        folds = [(r["name"], r["fold"]) for r in models if "fold" in r]
        if folds:
            lines += ["", "| model | fold ms | fold + verify ms | params MB before -> after | rewrites |",
                      "|---|--:|--:|--:|---|"]
            for name, fold in folds:
                counts = _counts_text(fold["counts"])
                lines.append("| %s | %s | %s | %.2f -> %.2f | %s |" % (
                    name, _ms(fold["fold_seconds"]), _ms(fold["seconds_with_verify"]),
                    fold["param_bytes_before"] / 1e6, fold["param_bytes_after"] / 1e6, counts))
        lines.append("")
    scaling = results.get("fold_scaling")
    if scaling:
        lines += _fold_scaling(scaling, results["config"]["fold_repeats"])
    shapes_by_note = {}
    for result in kernels:
        for note in result.get("notes", []):
            shapes_by_note.setdefault((result["label"], note), []).append(result["shape_label"])
    notes = results["notes"] + [
        "%s %s: %s" % (label, ", ".join(shapes), note) for (label, note), shapes in shapes_by_note.items()
    ] + ["%s: %s" % (r["name"], n) for r in models + ([scaling] if scaling else []) for n in r.get("notes", [])]
    if notes:
        lines += ["#### Notes", ""] + ["- " + n for n in notes] + [""]
    return "\n".join(lines)


def _fold_scaling(scaling, repeats):
    """The fold-scaling section: one row per chain size, then the verdict on its target."""
    lines = ["#### Fold scaling: %s, %s" % (scaling["name"], scaling["source"]), ""]
    if "skipped" in scaling:
        return lines + ["Skipped: %s" % scaling["skipped"], ""]
    if scaling["rows"]:
        lines += [
            "foldnorm.fold_model(model, verify=False), median of %d runs, the sizes interleaved; per pair vs "
            "%d = time per pair / the %d-pair chain's, paired per round (1.00x: linear)." % (
                repeats, scaling["smallest_pairs"], scaling["smallest_pairs"]),
            "",
            "| pairs | BN nodes before -> after | fold ms (min-max) | us per pair | per pair vs %d | "
            "fold + verify ms | verify max rel error |" % scaling["smallest_pairs"],
            "|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for row in scaling["rows"]:
            timing = row["fold"]
            lines.append("| %d | %d -> %d | %s (%s-%s) | %.0f | %s | %s | %.1e |" % (
                row["pairs"], row["batch_norm_nodes"], row["batch_norm_nodes_left"], _ms(timing["median"]),
                _ms(timing["min"]), _ms(timing["max"]), 1e6 * row["seconds_per_pair"],
                _ratio(row["per_pair_vs_smallest"]), _ms(row["seconds_with_verify"]), row["verify_max_rel_error"]))
        lines.append("")
    verdict = scaling["target"]
    measured = verdict["measured"]
    measured = "%.3g s (%.3g-%.3g)" % (measured["median"], measured["min"], measured["max"]) if measured else ""
    if verdict.get("why"):
        measured = "; ".join(t for t in (measured, verdict["why"]) if t)
    state = {True: "met", False: "**not met**", None: "not measured"}[verdict["met"]]
    lines += ["| target | measured (min-max) | verdict |", "|---|---|---|",
              "| %s | %s | %s |" % (verdict["target"], measured, state), ""]
    return lines


def _counts_text(counts):
    """FoldReport.counts() as `folded Conv 53; left 0`: nested dicts flattened, empty ones dropped."""
    parts = []
    for name, value in counts.items():
        if isinstance(value, dict):
            if value:
                parts.append("%s %s" % (name, ", ".join("%s %s" % item for item in value.items())))
        else:
            parts.append("%s %s" % (name, value))
    return "; ".join(parts)


def plot_names(results):
    """The PNGs `plot` makes of these results, in order."""
    names = []
    if any("rows" in r for r in results["kernels"]):
        names.append("kernels_gbps.png")
        if len(results["machine"]["threads"]) > 1:
            names.append("thread_scaling.png")
    if any("latency" in r for r in results["models"]):
        names.append("model_latency.png")
    return names


def plot(results, directory):
    """The PNGs of plot_names; returns their paths, or a note when matplotlib is not importable.

    A run from a busy machine says so on every plot, as its table does."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not importable (install the `bench` extra): no plots"
    kernels = [r for r in results["kernels"] if "rows" in r]
    threads = results["machine"]["threads"]
    models = [r for r in results["models"] if "latency" in r]
    makers = {"kernels_gbps.png": lambda: _plot_bandwidth(plt, kernels, threads),
              "thread_scaling.png": lambda: _plot_scaling(plt, kernels, threads),
              "model_latency.png": lambda: _plot_models(plt, models)}
    paths = []
    for name in plot_names(results):
        fig = makers[name]()
        _mark_busy(fig, results.get("machine_check") or {"busy": False})
        path = os.path.join(directory, name)
        # The run each PNG was drawn from, in its metadata: the run-of-record test reads it back.
        fig.savefig(path, dpi=90, bbox_inches="tight", metadata={"Source": plot_source(results)})
        plt.close(fig)
        paths.append(path)
    return paths, None


def plot_source(results):
    """What a PNG's Source metadata says of the run it was drawn from."""
    return "foldnorm benchmarks, %s run of %s, foldnorm %s" % (
        results["mode"], results["machine"]["date"], results["machine"]["versions"]["foldnorm"])


def _mark_busy(fig, check):
    """On a busy machine's plots: the warning above the plot and across it."""
    if not check["busy"]:
        return
    fig.text(0.5, 1.0, "\n".join(["BUSY MACHINE: the timings of this run are unreliable"] + check["reasons"]),
             ha="center", va="bottom", color="red", fontsize=8, fontweight="bold")
    fig.text(0.5, 0.5, "BUSY MACHINE", ha="center", va="center", rotation=30, fontsize=48, color="red",
             alpha=0.12, fontweight="bold")


def _plot_bandwidth(plt, kernels, threads):
    """GB/s of foldnorm per case and thread count (bars, min-max whiskers), its peers and the copy roof."""
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.32 * len(kernels) * len(threads) ** 0.5))
    shown = set()
    for i, t, rows, offset, height in _bars_by_thread_count(kernels, threads):
        traffic = [k["traffic_bytes"] for k in kernels]
        gbps = [r["gbps"] for r in rows]
        # Whiskers from the slowest to the fastest sample.
        low = [g - b / r["foldnorm"]["max"] / 1e9 for g, b, r in zip(gbps, traffic, rows)]
        high = [b / r["foldnorm"]["min"] / 1e9 - g for g, b, r in zip(gbps, traffic, rows)]
        ax.barh(offset, gbps, height, color="C%d" % (i % 10), alpha=0.8, label="foldnorm, %d thread%s" % (
            t, "" if t == 1 else "s"), xerr=[low, high], error_kw={"elinewidth": 0.6, "ecolor": "gray"})
        for key, marker, color, label in (("copy_gbps", "|", "black", "copy of the same size (the roof)"),
                                          ("onnxruntime_gbps", "o", "C8", "onnxruntime"),
                                          ("torch_gbps", "D", "C9", "PyTorch")):
            points = [(r.get(key), y) for r, y in zip(rows, offset) if r.get(key)]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, s=60 if marker == "|" else 14,
                           color=color, label=None if label in shown else label, zorder=3)
                shown.add(label)
    ax.set_xlabel("GB/s: bytes the kernel must read and write / median time (whiskers: slowest to fastest run)")
    ax.set_title("foldnorm's kernels against the memory roof and their peers, at each thread count")
    _label_cases(ax, kernels)
    return fig


def _plot_scaling(plt, kernels, threads):
    """Speed-up over the fewest threads, one bar per case and larger thread count (min-max whiskers), beside
    the same-size copy's own speed-up (what the memory allows) and the ideal."""
    base, more = threads[0], threads[1:]
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.32 * len(kernels) * len(more) ** 0.5))
    shown = set()
    for i, t, rows, offset, height in _bars_by_thread_count(kernels, more):
        ratios = [r["scaling"] for r in rows]
        medians = [r["median"] if r else float("nan") for r in ratios]
        low = [r["median"] - r["min"] if r else 0 for r in ratios]
        high = [r["max"] - r["median"] if r else 0 for r in ratios]
        color = "C%d" % ((i + 1) % 10)  # the colour of this thread count in the bandwidth plot
        ax.barh(offset, [m - 1 for m in medians], height, left=1, color=color, alpha=0.8,
                label="foldnorm, %d threads" % t, xerr=[low, high], error_kw={"elinewidth": 0.6, "ecolor": "gray"})
        copies = [(r["copy_scaling"]["median"], y) for r, y in zip(rows, offset) if r.get("copy_scaling")]
        label = "copy of the same size: what the memory allows"
        ax.scatter([c for c, _ in copies], [y for _, y in copies], marker="|", s=60, color="black", zorder=3,
                   label=None if label in shown else label)
        shown.add(label)
        ax.axvline(t / base, color=color, linestyle=":", linewidth=1.2, label="ideal at %d threads (%gx)" % (t, t / base))
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("speed-up over %d thread%s: that time / this one, paired per round (whiskers: min-max)"
                  % (base, "" if base == 1 else "s"))
    ax.set_title("Thread scaling of foldnorm's kernels against the copy's")
    _label_cases(ax, kernels)
    return fig


def _bars_by_thread_count(kernels, counts):
    """One bar per kernel case and thread count, a case's bars side by side around its row.

    Yields, for each thread count: its index, the count, every case's result row at that count, the
    y positions of their bars and the bars' height.
    """
    import numpy as np

    y = np.arange(len(kernels))
    height = 0.8 / len(counts)
    for i, t in enumerate(counts):
        rows = [{r["threads"]: r for r in k["rows"]}[t] for k in kernels]
        yield i, t, rows, y + (i - (len(counts) - 1) / 2) * height, height


def _label_cases(ax, kernels):
    """Label the rows with the kernel cases (first at the top); the legend goes beside the plot, off the data."""
    ax.set_yticks(range(len(kernels)), ["%s %s" % (k["label"], k["shape_label"]) for k in kernels], fontsize=7)
    ax.set_ylim(len(kernels) - 0.5, -0.5)  # the first case at the top
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.figure.tight_layout()


MODEL_RATIOS = (("folded_vs_original", "folded by foldnorm"), ("ort_basic_vs_original", "onnxruntime's own basic fusions"))


def _plot_models(plt, models):
    """Latency after / before, paired per round, for foldnorm's fold and onnxruntime's own fusions."""
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(9, 1.6 + 0.5 * len(models)), sharey=True)
    y = np.arange(len(models))
    height = 0.8 / len(MODEL_RATIOS)
    for ax, level in zip(axes, ("disabled", "enabled")):
        for i, (name, label) in enumerate(MODEL_RATIOS):
            ratios = [m.get("ratios", {}).get("%s/%s" % (name, level)) for m in models]
            offset = y + (i - (len(MODEL_RATIOS) - 1) / 2) * height
            medians = [r["median"] if r else np.nan for r in ratios]
            low = [r["median"] - r["min"] if r else 0 for r in ratios]
            high = [r["max"] - r["median"] if r else 0 for r in ratios]
            ax.barh(offset, [m - 1 for m in medians], height, left=1, color="C%d" % i, label=label,
                    xerr=[low, high], error_kw={"elinewidth": 0.6, "ecolor": "gray"})
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_title("onnxruntime graph optimizations %s" % ("off" if level == "disabled" else "on"), fontsize=9)
        ax.set_xlabel("latency after / before, paired per round (below 1: faster)", fontsize=8)
    axes[0].set_yticks(y, [m["name"] for m in models], fontsize=8)
    axes[0].set_ylim(len(models) - 0.5, -0.5)  # the first model at the top
    fig.suptitle("Model latency after folding, relative to the original model (whiskers: min-max)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, -0.02), ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
