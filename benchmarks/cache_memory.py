"""The kernels in cache and beyond the last-level cache, each against the same-size multi-threaded copy.

A kernel streaming from memory is bound by bandwidth, and the copy of its tensor is its roof; once the
tensor sits in the last-level cache the copy runs much faster, and what is left is the kernel's own
arithmetic (its vector path). Two shape sets are timed, both sized from the measured caches: one whose
whole working set fits in the last-level cache (tensors of FIT_SHARE of it) and one larger than it
(BEYOND_FACTOR times it), the latter capped so that the tensors a case holds at once take at most
MEMORY_SHARE of the available memory. When that cap keeps the tensors within the cache, the result says so.
"""
import gc
import statistics
import time

import numpy as np

from . import machine
from .harness import Unavailable, first_line, paired_ratio
from .kernels import KernelCase, BENCHES, time_against_copy

KERNELS = ("batch_norm", "batch_norm_train", "batch_norm_backward", "layer_norm")
FIT_SHARE = 1 / 8
BEYOND_FACTOR = 2
MEMORY_SHARE = 0.5
RESIDENT_TENSORS = 6  # x, dy, y, the copy's destination, the kernel's outputs and its input's making
UNKNOWN_LLC_BYTES = 32 << 20  # assumed when the caches cannot be read
SMOKE_SIZES = (64 << 10, 256 << 10)  # fit and beyond in smoke runs: sizes that say nothing about the caches
FEATURE_MAP = (64, 56, 56)  # a batch-norm tensor is (N,) + this
ROW_WIDTH = 768  # a layer-norm tensor is (rows, ROW_WIDTH)


def tensor_sizes(llc_bytes, available_bytes):
    """(fit bytes, beyond bytes, note or None) for a last-level cache of llc_bytes (None: unknown)."""
    notes = []
    if llc_bytes is None:
        llc_bytes = UNKNOWN_LLC_BYTES
        notes.append("the cache sizes are unknown here: %s assumed for the last-level cache"
                     % machine.size_text(llc_bytes))
    fit = int(llc_bytes * FIT_SHARE)
    beyond = int(llc_bytes * BEYOND_FACTOR)
    if available_bytes is not None and beyond * RESIDENT_TENSORS > available_bytes * MEMORY_SHARE:
        beyond = int(available_bytes * MEMORY_SHARE / RESIDENT_TENSORS)
        if beyond <= llc_bytes:
            notes.append("the larger set cannot exceed the last-level cache (%s): %s of memory available caps "
                         "its tensors at %s" % (machine.size_text(llc_bytes), machine.size_text(available_bytes),
                                                machine.size_text(beyond)))
    return fit, beyond, "; ".join(notes) or None


def shape_for(kernel, nbytes):
    """A float32 shape of about nbytes for `kernel`: (N, 64, 56, 56) for batch norm, (rows, 768) for layer norm."""
    per_item = int(np.prod(FEATURE_MAP)) if kernel.startswith("batch_norm") else ROW_WIDTH
    items = max(1, round(nbytes / (4 * per_item)))
    return (items,) + FEATURE_MAP if kernel.startswith("batch_norm") else (items, ROW_WIDTH)


def cases(fit_bytes, beyond_bytes, kernels=KERNELS):
    """[(set name, KernelCase)]: every kernel in cache, then every kernel beyond it."""
    return [(name, KernelCase(kernel, shape_for(kernel, nbytes)))
            for name, nbytes in (("cache", fit_bytes), ("memory", beyond_bytes)) for kernel in kernels]


def run(threads, repeats, settle, kernels=KERNELS, sizes=None):
    """Both shape sets timed against the copy at every thread count; `sizes` (fit, beyond) overrides the caches."""
    found = machine.caches()
    llc = machine.last_level_cache(found)
    if sizes is None:
        fit, beyond, note = tensor_sizes(llc["bytes_total"] if llc else None, machine.available_memory())
    else:
        (fit, beyond), note = sizes, "sizes fixed for a smoke run, not set from the caches"
    started = time.perf_counter()
    result = {"caches": found, "last_level_bytes": llc["bytes_total"] if llc else None, "fit_bytes": fit,
              "beyond_bytes": beyond, "note": note, "cases": []}
    for set_name, case in cases(fit, beyond, kernels):
        result["cases"].append(_run_case(set_name, case, threads, repeats, settle))
        gc.collect()  # the larger set's tensors are freed before the next case allocates its own
    result["seconds"] = time.perf_counter() - started
    return result


def _run_case(set_name, case, threads, repeats, settle):
    entry = {"set": set_name, "key": case.key, "kernel": case.kernel, "shape": list(case.shape),
             "tensor_bytes": case.elements * 4}
    try:
        samples = time_against_copy(BENCHES[case.kernel](case, np.random.default_rng(0)), threads, repeats,
                                    settle=settle)
    except Unavailable as error:
        entry["skipped"] = str(error)
        return entry
    except MemoryError as error:
        entry["skipped"] = "out of memory: %s" % first_line(error)
        return entry
    entry["rows"] = []
    for t in threads:
        mine, copy = samples["foldnorm@%d" % t], samples["copy@%d" % t]
        entry["rows"].append({
            "threads": t, "foldnorm": mine.summary(), "copy": copy.summary(),
            "gbps": case.traffic_bytes / mine.summary()["median"] / 1e9,
            "copy_gbps": 2 * case.elements * 4 / copy.summary()["median"] / 1e9,
            "x_copy": paired_ratio(mine, copy),
        })
    return entry


def markdown(result):
    """The report's section: where the sizes came from, then one row per kernel, set and thread count."""
    llc = result["last_level_bytes"]
    lines = ["#### Cache and memory: each kernel against the same-size copy", "",
             "Caches: %s. In cache: tensors of about %s (%s of the last-level cache); beyond it: about %s." % (
                 machine.caches_text(result["caches"]), machine.size_text(result["fit_bytes"]),
                 "%.3g" % (result["fit_bytes"] / llc) if llc else "n/a", machine.size_text(result["beyond_bytes"])),
             "x copy = kernel time / copy time, median of per-round pairs.", ""]
    if result["note"]:
        lines += ["**Note: %s.**" % result["note"], ""]
    lines += ["| kernel | set | shape | tensor | thr | foldnorm ms | GB/s | copy GB/s | x copy |",
              "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for entry in result["cases"]:
        head = "| %s | %s | %s | %s |" % (entry["kernel"], entry["set"], "x".join(map(str, entry["shape"])),
                                          machine.size_text(entry["tensor_bytes"]))
        if "rows" not in entry:
            lines.append(head + " | skipped: %s | | | |" % entry["skipped"])
            continue
        for row in entry["rows"]:
            lines.append(head + " %d | %.3g | %.1f | %.1f | %.2fx |" % (
                row["threads"], row["foldnorm"]["median"] * 1e3, row["gbps"], row["copy_gbps"],
                row["x_copy"]["median"]))
    at_most = [(e["set"], e["rows"][-1]) for e in result["cases"] if "rows" in e]  # at the most threads
    if at_most:
        speeds = ["%.1f GB/s %s" % (statistics.median(r["copy_gbps"] for n, r in at_most if n == name), words)
                  for name, words in (("cache", "in cache"), ("memory", "beyond it"))
                  if any(n == name for n, _ in at_most)]
        lines += ["", "The copy at %d threads: %s (median over the cases)." % (at_most[0][1]["threads"],
                                                                            ", ".join(speeds))]
    return lines + [""]
