"""The A/B comparison's outputs: the Markdown summary (stdout, ab.md, a CI job summary) and its plot."""
import os

from . import machine
from .report import topology_text


def _ms(seconds):
    return "%.3g" % (seconds * 1e3)


def _interval(row):
    if row["high"] is None:
        return "n/a (too few rounds)"
    return "%.3f-%.3f" % (row["low"], row["high"])


def figure_label(name):
    """A figure's name in words: `kernel/batch_norm_NHWC/32x256x28x28/t2` -> `batch_norm NHWC 32x256x28x28, 2 threads`."""
    parts = name.split("/")
    if parts[0] in ("kernel", "copy") and len(parts) == 4:
        threads = int(parts[3][1:])
        text = "%s %s, %d thread%s" % (parts[1].replace("_NHWC", " NHWC"), parts[2].replace("_g", " g"), threads,
                                       "" if threads == 1 else "s")
        return text if parts[0] == "kernel" else "copy beside " + text
    if parts[0] == "fold" and len(parts) == 2 and parts[1].startswith("conv_bn_chain_"):
        return "fold of a %s-pair Conv+BN chain" % parts[1].rsplit("_", 1)[1]
    return case_label(name)


def case_label(key):
    """A kernel case's key in words: `group_norm/16x256x32x32_g32` -> `group_norm 16x256x32x32 g32`."""
    return key.replace("_NHWC/", " NHWC ").replace("/", " ").replace("_g", " g")


def headline(results):
    """The verdict in one line, as the first thing a reader sees."""
    verdict = results["verdict"]
    if verdict["flagged"]:
        parts = []
        if verdict["counts_flagged"]:
            parts.append("deterministic counts: %s" % ", ".join(map(case_label, verdict["counts_flagged"])))
        if verdict["clock_flagged"] and verdict["clock_reliable"]:
            parts.append("timings: %s" % ", ".join(map(figure_label, verdict["clock_flagged"])))
        return "**SLOWDOWN FLAGGED** (%s)." % "; ".join(parts)
    text = "No slowdown flagged."
    if verdict["clock_flagged"] and not verdict["clock_reliable"]:
        text += (" Timings would flag %s, but the machine was busy: the verdict follows the deterministic "
                 "counts alone." % ", ".join(map(figure_label, verdict["clock_flagged"])))
    if not verdict["counts_available"] and not verdict["clock_reliable"]:
        text += " **Neither signal could be trusted here** (busy machine, no counts): nothing was checked."
    return text


def markdown(results):
    check = results["machine_check"]
    base, head = results["base"], results["head"]
    lines = ["### foldnorm A/B: %s against %s" % (head["description"], base["description"]), ""]
    lines += machine.banner(check)
    lines += [headline(results), ""]
    info = results["machine"]
    lines += [
        "Machine: %s, %d usable cores (%s). Threads: %s. %d rounds; in each, one worker process per side, "
        "the order alternating, %d timed calls per figure after a warm-up. Exit code 1 on a flagged "
        "slowdown, 0 otherwise." % (
            info["cpu_model"], info["usable_cores"], topology_text(info["topology"]),
            ", ".join(map(str, results["threads"])), results["rounds"], results["inner_calls"]),
        "",
    ]
    if head.get("slowdown_injected"):
        lines += ["Slowdown injected on purpose into the head (FOLDNORM_BENCH_TWICE=%s): those kernels run "
                  "twice per call." % head["slowdown_injected"], ""]
    lines += _counts_section(results["counts"])
    lines += _timings_section(results)
    if results["only_base"] or results["only_head"]:
        lines += ["Not compared: only in the base: %s; only in the head: %s." % (
            ", ".join(results["only_base"]) or "none", ", ".join(results["only_head"]) or "none"), ""]
    if results["notes"]:
        lines += ["#### Notes", ""] + ["- " + n for n in results["notes"]] + [""]
    lines.append("%.0f s in all%s." % (results["elapsed_seconds"], (
        ", of which %.0f s building the base" % base["build_seconds"]) if "build_seconds" in base else ""))
    return "\n".join(lines)


def _counts_section(section):
    lines = ["#### Deterministic counts (valgrind, 1 thread, per element of the tensor)", ""]
    if "rows" not in section:
        return lines + ["Not measured: %s." % section["skipped"], ""]
    lines += [
        "Instructions and last-level-cache bytes (misses x 64 B; simulated 4 MiB cache, 8 MiB tensors) per "
        "element, the same from run to run (to 0.2%%). Flagged above %.0f%% more." % (100 * section["threshold"]),
        "",
        "| kernel | instructions base | head | head/base | LL bytes base | head | head/base | |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in section["rows"]:
        ins, ll = row["instructions"], row["ll_bytes"]
        lines.append("| %s | %.3f | %.3f | %.3f | %.2f | %.2f | %.3f | %s |" % (
            case_label(row["key"]), ins["base"], ins["head"], ins["ratio"], ll["base"], ll["head"], ll["ratio"],
            "**MORE WORK**" if row["flagged"] else ""))
    for side, skipped in section.get("skipped_cases", {}).items():
        for key, why in skipped.items():
            lines.append("| %s | %s: %s | | | | | | |" % (key, side, why))
    return lines + [""]


def _timings_section(results):
    rows = results["timings"]
    reliable = results["verdict"]["clock_reliable"]
    confidence = rows[0]["confidence"] if rows else 0
    lines = [
        "#### Timings (head / base, paired by round)%s" % ("" if reliable else ": UNRELIABLE, busy machine"),
        "",
        "Ratio: Hodges-Lehmann estimate over the rounds (below 1: the head is faster); interval: %.2f%% "
        "(so that a same-code comparison flags any of these %d figures at most %.0f%% of the time). "
        "Flagged when the ratio is above %.2f and the interval above 1." % (
            100 * confidence, len(rows), 100 * results["false_alarm"], 1 + results["threshold"]),
        "",
        "| figure | base ms | head ms | head/base | interval | |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        mark = ""
        if row["flagged"]:
            mark = "**SLOWER**" if reliable else "slower? (busy machine)"
        elif row["significant"]:
            mark = "slower, within the threshold"
        elif row["high"] is not None and row["high"] < 1:
            mark = "faster"
        lines.append("| %s | %s | %s | %.3f | %s | %s |" % (
            figure_label(row["name"]), _ms(row["base_median"]), _ms(row["head_median"]), row["ratio"], _interval(row),
            mark))
    controls = results["controls"]
    if controls:
        spread = [c["ratio"] for c in controls]
        lines += ["", "Control, never flagged: the same-size copy, whose code is the same on both sides, came out "
                  "at %.3f-%.3f head/base over its %d figures (far from 1, it would mean that the machine moved between "
                  "the sides)." % (
                      min(spread), max(spread), len(spread))]
    return lines + [""]


def plot(results, directory):
    """ab_ratios.png: each figure's head/base ratio with its interval, and the counts' ratios."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not importable (install the `bench` extra): no plots"
    rows = results["timings"]
    count_rows = results["counts"].get("rows", [])
    if not rows and not count_rows:
        return [], None
    panels = 2 if count_rows else 1
    height = 1.5 + 0.22 * max(len(rows), 2 * len(count_rows))
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, height), squeeze=False)
    ax = axes[0][0]
    y = list(range(len(rows)))
    ratios = [r["ratio"] for r in rows]
    lows = [r["ratio"] - r["low"] for r in rows]
    highs = [(r["high"] if r["high"] is not None else r["ratio"] * 2) - r["ratio"] for r in rows]
    colors = ["C3" if r["flagged"] else "C0" for r in rows]
    ax.errorbar(ratios, y, xerr=[lows, highs], fmt="none", ecolor="gray", capsize=2)
    ax.scatter(ratios, y, c=colors, zorder=3, s=18)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvline(1 + results["threshold"], color="C3", linestyle="--", linewidth=1,
               label="slowdown threshold (%.0f%%)" % (100 * results["threshold"]))
    ax.set_yticks(y, [figure_label(r["name"]) for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("time with the change / time before it (interval: %.1f%%)" % (100 * rows[0]["confidence"])
                  if rows else "time with the change / time before it")
    ax.set_title("Timings, paired round by round%s" % ("" if results["verdict"]["clock_reliable"]
                                                       else " (busy machine: unreliable)"), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    if count_rows:
        ax = axes[0][1]
        y = list(range(len(count_rows)))
        for offset, figure, label in ((-0.2, "instructions", "instructions"), (0.2, "ll_bytes", "last-level cache bytes")):
            ax.barh([v + offset for v in y], [r[figure]["ratio"] for r in count_rows], 0.4, label=label)
        ax.axvline(1 + results["count_threshold"], color="C3", linestyle="--", linewidth=1,
                   label="threshold (%.0f%%)" % (100 * results["count_threshold"]))
        ax.set_yticks(y, [case_label(r["key"]) for r in count_rows], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("count with the change / count before it (exact)")
        ax.set_title("Deterministic counts per element (valgrind)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = os.path.join(directory, "ab_ratios.png")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return [path], None
