"""How one output of the folded model is judged against the original's: tolerances and the noise floor.

An element passes when |folded - original| <= atol + rtol * |original|, per output:
- rtol: the caller's, else DEFAULT_RTOL by dtype (1e-4 for float32/float64, 1e-2 for float16/bfloat16),
  0 for integer and bool outputs (which must match exactly).
- atol: the caller's, else the larger of
  * rtol * max|original| over the output's finite elements (at least the dtype's smallest normal number):
    folding moves rounding by a few ulps of the values that were summed, which scale with the output's
    magnitude, so elements that happen to be near zero do not fail on rounding alone; and
  * NOISE_FACTOR * noise, where noise is the model's own rounding noise on these inputs: the largest
    |optimized - plain| between two onnxruntime runs of the ORIGINAL model, one with every graph
    optimization (onnxruntime fuses Conv+BatchNormalization itself and reorders computations), one with
    none. A model whose outputs are that sensitive to rounding (a sigmoid near 0 after a large
    cancellation) gets the room its own arithmetic needs; a wrong fold (a wrong scale on one channel)
    moves outputs by far more than a few times that noise and still fails.
NaN matches NaN and an infinity matches the same infinity; anything else non-finite that differs fails.
max_rel_error is max|folded - original| / max|original| (the error relative to the output's largest
magnitude: element-wise ratios mean nothing next to zeros).
"""
import math
from dataclasses import dataclass

import numpy as np

DEFAULT_RTOL = {"float32": 1e-4, "float64": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
NOISE_FACTOR = 4.0


@dataclass
class OutputComparison:
    """How one graph output of the folded model compares with the original's.

    noise: the original model's own rounding noise on this output (see the module docstring), None when it
    could not be measured; note: why an output failed beyond its numbers (a different shape, ...).
    """

    name: str
    max_abs_error: float
    max_rel_error: float
    passed: bool
    dtype: str = ""
    rtol: float = 0.0
    atol: float = 0.0
    note: str = ""
    noise: float | None = None

    def tolerance_text(self):
        return "rtol %.0e atol %.1e" % (self.rtol, self.atol)

    def to_dict(self):
        return {
            "name": self.name,
            "dtype": self.dtype,
            "max_abs_error": json_float(self.max_abs_error),
            "max_rel_error": json_float(self.max_rel_error),
            "noise": None if self.noise is None else json_float(self.noise),
            "rtol": json_float(self.rtol),
            "atol": json_float(self.atol),
            "passed": self.passed,
            "note": self.note,
        }


def compare_output(name, reference, candidate, *, rtol=None, atol=None, noise=None):
    """Compare one output (an array, or a sequence of arrays) of the folded model with the original's.

    noise: the original's own rounding noise on this output (max abs), which widens a defaulted atol.
    """
    if isinstance(reference, (list, tuple)) or isinstance(candidate, (list, tuple)):
        return _compare_sequence(name, reference, candidate, rtol, atol, noise)
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    dtype = dtype_name(reference)
    if candidate.dtype != reference.dtype:
        return diverged(name, dtype, "dtype %s, original %s" % (dtype_name(candidate), dtype))
    if candidate.shape != reference.shape:
        return diverged(name, dtype, "shape %s, original %s" % (candidate.shape, reference.shape))
    if reference.dtype.kind not in "fiub" and dtype != "bfloat16":
        if np.array_equal(reference, candidate):
            return OutputComparison(name, 0.0, 0.0, True, dtype)
        return diverged(name, dtype, "values differ")

    is_float = reference.dtype.kind == "f" or dtype == "bfloat16"
    out_rtol = rtol if rtol is not None else DEFAULT_RTOL.get(dtype, 0.0) if is_float else 0.0
    with np.errstate(all="ignore"):  # huge tolerances or values overflow harmlessly to inf here
        ref = reference.astype(np.float64)
        got = candidate.astype(np.float64)
        finite = np.isfinite(ref)
        magnitude = float(np.abs(ref[finite]).max()) if finite.any() else 0.0
        if atol is not None:
            out_atol = atol
        elif is_float:
            smallest_normal = float(np.finfo(np.float32 if dtype == "bfloat16" else reference.dtype).tiny)
            out_atol = max(out_rtol * max(magnitude, smallest_normal), NOISE_FACTOR * (noise or 0.0))
        else:
            out_atol = 0.0
        same = (ref == got) | (np.isnan(ref) & np.isnan(got))
        error = np.where(same, 0.0, np.abs(got - ref))
        error = np.where(np.isnan(error), math.inf, error)
        max_abs = float(error.max()) if error.size else 0.0
        if max_abs == 0.0:
            max_rel = 0.0
        elif magnitude > 0.0:
            max_rel = max_abs / magnitude
        else:
            max_rel = math.inf
        passed = bool(np.all(error <= out_atol + out_rtol * np.abs(np.where(finite, ref, 0.0))))
    return OutputComparison(name, max_abs, max_rel, passed, dtype, out_rtol, out_atol, noise=noise)


def rounding_noise(plain, optimized):
    """The largest |optimized - plain| over elements finite in both (sequences: over all parts); None when
    the two runs do not even agree on types and shapes, 0.0 for non-float outputs."""
    if isinstance(plain, (list, tuple)) or isinstance(optimized, (list, tuple)):
        if not (isinstance(plain, (list, tuple)) and isinstance(optimized, (list, tuple))) or \
                len(plain) != len(optimized):
            return None
        parts = [rounding_noise(p, o) for p, o in zip(plain, optimized)]
        return None if None in parts else max(parts, default=0.0)
    plain, optimized = np.asarray(plain), np.asarray(optimized)
    if plain.shape != optimized.shape or plain.dtype != optimized.dtype:
        return None
    if not (plain.dtype.kind == "f" or dtype_name(plain) == "bfloat16"):
        return 0.0
    with np.errstate(all="ignore"):
        a, b = plain.astype(np.float64), optimized.astype(np.float64)
        both = np.isfinite(a) & np.isfinite(b)
        return float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0


def merge_comparisons(parts):
    """One comparison from the same output's comparisons at several input shapes: the worst of each."""
    if len(parts) == 1:
        return parts[0]
    failed = [p for p in parts if not p.passed]
    noises = [p.noise for p in parts]
    return OutputComparison(
        parts[0].name,
        max(p.max_abs_error for p in parts),
        max(p.max_rel_error for p in parts),
        not failed,
        parts[0].dtype,
        max(p.rtol for p in parts),
        max(p.atol for p in parts),
        note=failed[0].note if failed else "",
        noise=None if None in noises else max(noises),
    )


def diverged(name, dtype, note):
    return OutputComparison(name, math.inf, math.inf, False, dtype, note=note)


def _compare_sequence(name, reference, candidate, rtol, atol, noise):
    if not isinstance(reference, (list, tuple)) or not isinstance(candidate, (list, tuple)):
        return diverged(name, "sequence", "a sequence in only one model")
    if len(reference) != len(candidate):
        return diverged(name, "sequence", "%d elements, original %d" % (len(candidate), len(reference)))
    parts = [compare_output("%s[%d]" % (name, i), r, c, rtol=rtol, atol=atol, noise=noise)
             for i, (r, c) in enumerate(zip(reference, candidate))]
    failed = [p for p in parts if not p.passed]
    return OutputComparison(
        name,
        max((p.max_abs_error for p in parts), default=0.0),
        max((p.max_rel_error for p in parts), default=0.0),
        not failed,
        "sequence(%s)" % (parts[0].dtype if parts else ""),
        max((p.rtol for p in parts), default=0.0),
        max((p.atol for p in parts), default=0.0),
        note="; ".join("%s: %s" % (p.name, p.note or "beyond tolerance") for p in failed[:3]),
        noise=noise,
    )


def dtype_name(array):
    if isinstance(array, (list, tuple)):
        return "sequence"
    return np.asarray(array).dtype.name


def format_error(value):
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else "nan" if math.isnan(value) else "%.3g" % value


def json_float(value):
    """A float for JSON: non-finite values (a diverged output) become None, which JSON can represent."""
    return float(value) if math.isfinite(value) else None
