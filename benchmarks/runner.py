"""One benchmark run: its configuration, the kernel and model sections, and the files it writes."""
import os
import sys
import tempfile
import time
from dataclasses import dataclass

from . import cache_memory, fold_scaling, kernels, models, report


@dataclass
class Config:
    mode: str
    kernel_cases: list
    model_cases: list
    repeats: int
    reference_repeats: int
    model_repeats: int
    session_repeats: int
    fold_pairs: tuple
    fold_repeats: int
    warmup: int = 1
    cache_kernels: tuple = cache_memory.KERNELS  # timed in cache and beyond it; () for none
    cache_sizes: tuple = None  # (fit, beyond) bytes; None: from the measured caches

    def describe(self):
        return {
            "repeats": self.repeats,
            "reference_repeats": self.reference_repeats,
            "model_repeats": self.model_repeats,
            "session_repeats": self.session_repeats,
            "warmup": self.warmup,
            "kernel_cases": [c.key for c in self.kernel_cases],
            "models": [c.name for c in self.model_cases],
            "fold_pairs": list(self.fold_pairs),
            "fold_repeats": self.fold_repeats,
            "cache_kernels": list(self.cache_kernels),
        }


def config_for(mode):
    """The full run, the quick run (headline shapes, fewer repetitions) or the smoke run (tiny, for tests)."""
    if mode == "full":
        return Config(mode, kernels.FULL_CASES, models.FULL_MODELS, repeats=30, reference_repeats=3,
                      model_repeats=20, session_repeats=3, fold_pairs=(250, 500, 1000), fold_repeats=5)
    if mode == "quick":
        return Config(mode, kernels.QUICK_CASES, models.QUICK_MODELS, repeats=15, reference_repeats=1,
                      model_repeats=10, session_repeats=1, fold_pairs=(250, 1000), fold_repeats=3)
    if mode == "smoke":
        return Config(mode, kernels.SMOKE_CASES, models.SMOKE_MODELS, repeats=2, reference_repeats=1,
                      model_repeats=2, session_repeats=1, fold_pairs=(10, 20), fold_repeats=2,
                      cache_kernels=("batch_norm", "layer_norm"), cache_sizes=cache_memory.SMOKE_SIZES)
    raise ValueError("mode must be 'full', 'quick' or 'smoke', got %r" % mode)


def _log(text):
    print(text, file=sys.stderr, flush=True)


def run(config, threads, out_dir, make_plots=True):
    """Run every case of `config` at `threads`; write results.json, results.md and the PNGs into out_dir.

    Returns the results dict.
    """
    from . import machine
    from .harness import machine_info, settle_seconds

    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    results = {"schema": report.SCHEMA, "mode": config.mode, "config": config.describe(), "notes": []}
    _log("benchmarks: checking that the machine is quiet")
    start_check = machine.check_start(machine.topology().get("physical_cores") or max(threads))
    if start_check.busy:
        _log("benchmarks: BUSY MACHINE, the timings will be unreliable: %s" % "; ".join(start_check.reasons))
    monitor = machine.RunMonitor()
    _log("benchmarks: machine facts and copy roof at threads %s" % ",".join(map(str, threads)))
    settle = settle_seconds(threads)
    results["machine"] = machine_info(threads, settle)

    results["kernels"] = []
    for index, case in enumerate(config.kernel_cases, 1):
        _log("benchmarks: kernel %d/%d %s %s" % (index, len(config.kernel_cases), case.label, case.shape_label))
        result = kernels.run_case(case, threads, config.repeats, config.warmup, config.reference_repeats, settle)
        if "skipped" in result:
            _log("  skipped: %s" % result["skipped"])
        results["kernels"].append(result)

    results["cache_memory"] = None
    if config.cache_kernels:
        _log("benchmarks: %s in cache and beyond the last-level cache" % ", ".join(config.cache_kernels))
        results["cache_memory"] = cache_memory.run(threads, config.repeats, settle, config.cache_kernels,
                                                   config.cache_sizes)

    results["models"] = []
    if config.model_cases:
        with tempfile.TemporaryDirectory() as scratch:
            for index, case in enumerate(config.model_cases, 1):
                _log("benchmarks: model %d/%d %s" % (index, len(config.model_cases), case.name))
                results["models"].append(models.run_model(
                    case, max(threads), config.model_repeats, scratch, config.warmup, config.session_repeats, settle))

    results["fold_scaling"] = None
    if config.fold_pairs:
        _log("benchmarks: fold scaling, %s pairs" % ", ".join(map(str, config.fold_pairs)))
        results["fold_scaling"] = fold_scaling.run(config.fold_pairs, config.fold_repeats, settle)

    results["machine_check"] = machine.merge(("start", start_check), ("run", monitor.finish())).as_dict()
    results["targets"] = report.evaluate_targets(results["kernels"])
    results["figures"] = report.figures(results["kernels"], results["models"], results["fold_scaling"])
    results["plots"] = []
    if make_plots:
        paths, note = report.plot(results, out_dir)
        results["plots"] = [os.path.basename(p) for p in paths]
        if note:
            results["notes"].append(note)
    results["elapsed_seconds"] = time.perf_counter() - started
    table = report.markdown(results)
    report.write_json(results, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    _log("benchmarks: %.0f s; wrote results.json, results.md%s into %s" % (
        results["elapsed_seconds"], "".join(", " + p for p in results["plots"]), out_dir))
    return results
