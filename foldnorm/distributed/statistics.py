"""Per-channel batch statistics as NumPy building blocks: local summaries, their merge in a fixed order,
normalization with given statistics, and the backward pass's sums and apply.

These need no communication: foldnorm.distributed composes them around one collective each.
Statistics are float64 centred sums merged with Chan's update, never ``E[x^2] - E[x]^2``.
"""
from __future__ import annotations

import operator
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ChannelStats", "GradSums", "local_stats", "merge_stats", "normalize", "local_grad_sums",
           "merge_grad_sums", "normalize_backward"]

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

# Values reduced per piece: a piece's float64 temporaries (256 KiB) stay in a core's L2 cache.
_PIECE_ELEMS = 1 << 15


class ChannelStats(NamedTuple):
    """Per-channel statistics of a set of values: how many, their mean, and m2 = sum((x - mean)^2).

    ``count`` is the number of values per channel (the same for every channel); ``mean`` and ``m2`` are
    float64 arrays (C,). An empty set has count 0 and zero mean and m2.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def var(self) -> np.ndarray:
        """The biased (population) variance m2 / count, as the normalization uses it."""
        return self.m2 / self.count

    def unbiased_var(self) -> np.ndarray:
        """The unbiased variance m2 / (count - 1), as the running variance stores it."""
        return self.m2 / (self.count - 1)

    def invstd(self, eps: float) -> np.ndarray:
        """1 / sqrt(var + eps)."""
        return 1.0 / np.sqrt(self.var() + eps)


class GradSums(NamedTuple):
    """Per-channel sums of the batch norm backward pass over a set of values.

    ``count`` values per channel; ``sum_dy`` = sum(dy) and ``sum_dy_xmu`` = sum(dy * (x - mean)), float64
    arrays (C,), with mean the statistics' mean of the whole batch.
    """

    count: int
    sum_dy: np.ndarray
    sum_dy_xmu: np.ndarray


# ---------------------------------------------------------------------------------------------------
# Building blocks: NumPy in and out, no communication.


def local_stats(x: np.ndarray, *, channel_axis: int = 1) -> ChannelStats:
    """Per-channel ``(count, mean, m2)`` of one shard, in float64.

    Each piece of about 32,000 values gets an exact float64 two-pass (mean, then the sum of squared
    deviations from it); pieces are merged with Chan's update in order.

    Parameters
    ----------
    x : ndarray
        (N, C, *spatial), or (N, *spatial, C) with ``channel_axis=-1``; float16, float32 or float64.
        N (or a spatial size) may be 0: an empty shard has count 0.
    channel_axis : {1, -1}
        The channel axis: 1 (channels first) or -1 (channels last).

    Returns
    -------
    ChannelStats
        count = N * prod(spatial); mean and m2 float64 (C,).

    Examples
    --------
    >>> s = local_stats(np.array([[1.0, 10.0], [3.0, 20.0]]))
    >>> s.count, s.mean, s.m2
    (2, array([ 2., 15.]), array([ 2., 50.]))
    """
    x3 = _as_batch(x, "x", channel_axis)[0]
    return _stats_of(x3)


def merge_stats(parts: Sequence[ChannelStats]) -> ChannelStats:
    """The statistics of the union of several sets of values, from each set's statistics.

    Chan's update, applied left to right: the same parts in the same order give the same bits, which is
    why every rank merges the gathered parts itself, in rank order. Empty parts are skipped.

    Parameters
    ----------
    parts : sequence of ChannelStats
        At least one; all with the same number of channels.

    Returns
    -------
    ChannelStats

    Examples
    --------
    >>> a = local_stats(np.array([[1.0], [3.0]]))
    >>> b = local_stats(np.array([[5.0]]))
    >>> merge_stats([a, b])
    ChannelStats(count=3, mean=array([3.]), m2=array([8.]))
    """
    if len(parts) == 0:
        raise ValueError("parts must hold at least one ChannelStats")
    channels = len(parts[0].mean)
    count, mean, m2 = 0, np.zeros(channels), np.zeros(channels)
    for k, part in enumerate(parts):
        part_mean = np.asarray(part.mean, dtype=np.float64)
        part_m2 = np.asarray(part.m2, dtype=np.float64)
        if part_mean.shape != (channels,) or part_m2.shape != (channels,):
            raise ValueError("parts[%d] has statistics of shape %s and %s, expected (%d,)"
                             % (k, part_mean.shape, part_m2.shape, channels))
        n = int(part.count)
        if n == 0:
            continue
        if count == 0:
            count, mean, m2 = n, part_mean.copy(), part_m2.copy()
            continue
        total = count + n
        delta = part_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + part_m2 + delta * delta * (count * n / total)
        count = total
    return ChannelStats(count, mean, m2)


def normalize(x: np.ndarray, mean: np.ndarray, invstd: np.ndarray, weight: Optional[np.ndarray] = None,
              bias: Optional[np.ndarray] = None, *, channel_axis: int = 1) -> np.ndarray:
    """y = (x - mean) * invstd * weight + bias per channel, with given statistics.

    Computed as the training kernel does, in x's precision (float32 for float16):
    y = (x - shift) * alpha + beta with shift = mean and alpha = weight * invstd rounded to that
    precision, and beta = bias - (mean - shift) * alpha from float64; subtracting the rounded mean first
    keeps data far from zero (mean 1e3, std 1 in float32) exact where x * alpha + beta would not.

    Parameters
    ----------
    x : ndarray
        (N, C, *spatial), or (N, *spatial, C) with ``channel_axis=-1``; float16, float32 or float64; may
        be empty.
    mean, invstd : array_like (C,)
        The statistics, e.g. of `merge_stats` (``stats.mean``, ``stats.invstd(eps)``).
    weight, bias : array_like (C,), optional
        1 and 0 when None.
    channel_axis : {1, -1}

    Returns
    -------
    ndarray
        y, of x's shape and dtype.
    """
    x3, dtype, channels = _as_batch(x, "x", channel_axis)
    mean64 = _param(mean, "mean", channels, required=True)
    invstd64 = _param(invstd, "invstd", channels, required=True)
    weight64 = _param(weight, "weight", channels)
    bias64 = _param(bias, "bias", channels)
    return _normalize(x3, dtype, np.shape(x), mean64, invstd64, weight64, bias64)


def local_grad_sums(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, *, channel_axis: int = 1) -> GradSums:
    """Per-channel ``(count, sum(dy), sum(dy * (x - mean)))`` of one shard, in float64.

    Parameters
    ----------
    dy : ndarray
        The gradient of the loss with respect to y, of x's shape.
    x : ndarray
        (N, C, *spatial), or (N, *spatial, C) with ``channel_axis=-1``; float16, float32 or float64; may
        be empty.
    mean : array_like (C,)
        The mean of the whole batch (not of the shard).
    channel_axis : {1, -1}

    Returns
    -------
    GradSums
    """
    x3, _, channels = _as_batch(x, "x", channel_axis)
    dy3 = _as_like(dy, "dy", np.shape(x)).reshape(x3.shape)
    mean64 = _param(mean, "mean", channels, required=True)
    return _grad_sums_of(dy3, x3, mean64)


def merge_grad_sums(parts: Sequence[GradSums]) -> GradSums:
    """Several shards' `GradSums` added up, left to right (the same bits for the same order).

    Examples
    --------
    >>> a = GradSums(2, np.array([1.0]), np.array([0.5]))
    >>> merge_grad_sums([a, GradSums(1, np.array([2.0]), np.array([-1.0]))])
    GradSums(count=3, sum_dy=array([3.]), sum_dy_xmu=array([-0.5]))
    """
    if len(parts) == 0:
        raise ValueError("parts must hold at least one GradSums")
    count = 0
    sum_dy = np.zeros(len(parts[0].sum_dy))
    sum_dy_xmu = np.zeros(len(parts[0].sum_dy))
    for k, part in enumerate(parts):
        if np.shape(part.sum_dy) != sum_dy.shape or np.shape(part.sum_dy_xmu) != sum_dy.shape:
            raise ValueError("parts[%d] has sums of shape %s and %s, expected %s"
                             % (k, np.shape(part.sum_dy), np.shape(part.sum_dy_xmu), sum_dy.shape))
        count += int(part.count)
        sum_dy = sum_dy + np.asarray(part.sum_dy, dtype=np.float64)
        sum_dy_xmu = sum_dy_xmu + np.asarray(part.sum_dy_xmu, dtype=np.float64)
    return GradSums(count, sum_dy, sum_dy_xmu)


def normalize_backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                       weight: Optional[np.ndarray], sums: GradSums, *, channel_axis: int = 1) -> np.ndarray:
    """dx of batch norm for one shard, from the whole batch's statistics and gradient sums.

    With n = sums.count, xhat = (x - mean) * invstd:
    dx = weight * invstd * (dy - sum_dy / n - xhat * invstd * sum_dy_xmu / n),
    computed in x's precision (float32 for float16) as the backward kernel does:
    dx = (dy + (x - shift) * slope + offset) * alpha with per-channel coefficients from float64.

    Parameters
    ----------
    dy : ndarray
        Of x's shape.
    x : ndarray
        (N, C, *spatial), or (N, *spatial, C) with ``channel_axis=-1``; may be empty.
    mean, invstd : array_like (C,)
        The whole batch's statistics, as `sync_batch_norm_train` returns them.
    weight : array_like (C,) or None
    sums : GradSums
        The whole batch's sums (`merge_grad_sums` of every shard's `local_grad_sums`); count >= 1.
    channel_axis : {1, -1}

    Returns
    -------
    ndarray
        dx, of x's shape and dtype.
    """
    x3, dtype, channels = _as_batch(x, "x", channel_axis)
    dy3 = _as_like(dy, "dy", np.shape(x)).reshape(x3.shape)
    mean64 = _param(mean, "mean", channels, required=True)
    invstd64 = _param(invstd, "invstd", channels, required=True)
    weight64 = _param(weight, "weight", channels)
    if not isinstance(sums, GradSums):
        raise TypeError("sums must be a GradSums, got %s" % type(sums).__name__)
    sum_dy = _param(sums.sum_dy, "sums.sum_dy", channels, required=True)
    sum_dy_xmu = _param(sums.sum_dy_xmu, "sums.sum_dy_xmu", channels, required=True)
    if int(sums.count) < 1:
        raise ValueError("sums.count must be at least 1, got %r" % (sums.count,))
    return _normalize_backward(dy3, x3, dtype, np.shape(x), mean64, invstd64, weight64,
                               GradSums(int(sums.count), sum_dy, sum_dy_xmu))


# ---------------------------------------------------------------------------------------------------
# Arithmetic on (outer, C, inner) views: channels first (N, C, prod(spatial)), channels last
# (N * prod(spatial), C, 1).


def _pieces(outer: int, row_elems: int):
    """[lo, hi) ranges of rows of about _PIECE_ELEMS values each."""
    rows = max(1, _PIECE_ELEMS // max(1, row_elems))
    for lo in range(0, outer, rows):
        yield lo, min(outer, lo + rows)


def _per_channel(a: np.ndarray, x3: np.ndarray) -> np.ndarray:
    """a (C,) shaped to broadcast against x3's planes, or against its rows when channels are last."""
    return a[:, None] if x3.shape[2] != 1 else a


def _rows_or_planes(x3: np.ndarray) -> np.ndarray:
    """x3 itself, or its (outer, C) matrix when channels are last (a faster broadcast for NumPy)."""
    return x3 if x3.shape[2] != 1 else x3[:, :, 0]


def _stats_of(x3: np.ndarray) -> ChannelStats:
    outer, channels, inner = x3.shape
    if outer * inner == 0:
        return ChannelStats(0, np.zeros(channels), np.zeros(channels))
    parts = []
    for lo, hi in _pieces(outer, channels * inner):
        piece = x3[lo:hi]
        count = (hi - lo) * inner
        mean = piece.sum(axis=(0, 2), dtype=np.float64) / count
        centred = np.subtract(piece, mean[:, None], dtype=np.float64)
        parts.append(ChannelStats(count, mean, np.einsum("oci,oci->c", centred, centred)))
    return merge_stats(parts)


def _grad_sums_of(dy3: np.ndarray, x3: np.ndarray, mean: np.ndarray) -> GradSums:
    outer, channels, inner = x3.shape
    sum_dy, sum_dy_xmu = np.zeros(channels), np.zeros(channels)
    if outer * inner == 0:
        return GradSums(0, sum_dy, sum_dy_xmu)
    for lo, hi in _pieces(outer, channels * inner):
        dy_piece = dy3[lo:hi]
        centred = np.subtract(x3[lo:hi], mean[:, None], dtype=np.float64)
        sum_dy += dy_piece.sum(axis=(0, 2), dtype=np.float64)
        sum_dy_xmu += np.einsum("oci,oci->c", centred, dy_piece)
    return GradSums(outer * inner, sum_dy, sum_dy_xmu)


def _normalize(x3, dtype, shape, mean, invstd, weight, bias) -> np.ndarray:
    compute = x3.dtype
    alpha = (invstd if weight is None else weight * invstd).astype(compute)
    shift = mean.astype(compute)
    beta = ((0.0 if bias is None else bias) - (mean - shift.astype(np.float64)) * alpha.astype(np.float64))
    x2 = _rows_or_planes(x3)
    y = np.subtract(x2, _per_channel(shift, x3))
    y *= _per_channel(alpha, x3)
    y += _per_channel(beta.astype(compute), x3)
    return y.reshape(shape).astype(dtype, copy=False)


def _normalize_backward(dy3, x3, dtype, shape, mean, invstd, weight, sums: GradSums) -> np.ndarray:
    compute = x3.dtype
    count = float(sums.count)
    # The backward kernel's coefficients: alpha = weight * invstd kept outside leaves slope and offset on
    # the scale of dy, and (x - mean) is taken as (x - shift) - (mean - shift) as in the forward.
    slope64 = -invstd * ((sums.sum_dy_xmu * invstd) / count)
    shift = mean.astype(compute)
    rest = mean - shift.astype(np.float64)
    correction = np.zeros_like(rest)
    nonzero = rest != 0.0  # skipping 0 * slope keeps an infinite slope from turning a channel into NaN
    correction[nonzero] = slope64[nonzero] * rest[nonzero]
    offset = -(sums.sum_dy / count) - correction
    alpha = invstd if weight is None else weight * invstd
    x2, dy2 = _rows_or_planes(x3), _rows_or_planes(dy3)
    dx = np.subtract(x2, _per_channel(shift, x3))
    dx *= _per_channel(slope64.astype(compute), x3)
    dx += dy2
    dx += _per_channel(offset.astype(compute), x3)
    dx *= _per_channel(alpha.astype(compute), x3)
    return dx.reshape(shape).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------------
# Argument checks: an error names the argument and what was expected.


def _as_batch(x: Any, name: str, channel_axis: Any) -> Tuple[np.ndarray, np.dtype, int]:
    """x as its (outer, C, inner) view in the compute dtype (float32 for float16), x's dtype, and C."""
    try:
        axis = operator.index(channel_axis)
    except TypeError:
        axis = None
    if isinstance(channel_axis, bool) or axis not in (1, -1):
        raise ValueError("channel_axis must be 1 (channels first) or -1 (channels last), got %r"
                         % (channel_axis,))
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError("%s must be a float16, float32 or float64 array, got dtype %s" % (name, a.dtype))
    if a.ndim < 2:
        raise ValueError("%s must have at least 2 dimensions (N, C, ...), got shape %s" % (name, a.shape))
    channels = a.shape[axis]
    if channels == 0:
        raise ValueError("%s must have at least one channel, got shape %s" % (name, a.shape))
    dtype = a.dtype
    a = np.ascontiguousarray(a, dtype=np.float32 if dtype == np.float16 else dtype)
    if axis == 1:
        x3 = a.reshape(a.shape[0], channels, int(np.prod(a.shape[2:], dtype=np.int64)))
    else:
        x3 = a.reshape(int(np.prod(a.shape[:-1], dtype=np.int64)), channels, 1)
    return x3, dtype, channels


def _as_like(a: Any, name: str, shape: Tuple[int, ...]) -> np.ndarray:
    """A second tensor input (dy) of exactly `shape`, C-contiguous in its compute dtype."""
    arr = a if isinstance(a, np.ndarray) else np.asarray(a)
    if arr.dtype not in _FLOAT_DTYPES:
        raise TypeError("%s must be a float16, float32 or float64 array, got dtype %s" % (name, arr.dtype))
    if arr.shape != tuple(shape):
        raise ValueError("%s must have x's shape %s, got %s" % (name, tuple(shape), arr.shape))
    compute = np.dtype(np.float32) if arr.dtype == np.float16 else arr.dtype
    return np.ascontiguousarray(arr, dtype=compute)


def _param(p: Any, name: str, channels: int, required: bool = False) -> Optional[np.ndarray]:
    """A per-channel array (C,) as float64, or None when absent and optional."""
    if p is None:
        if required:
            raise TypeError("%s is required" % name)
        return None
    arr = p if isinstance(p, np.ndarray) else np.asarray(p)
    if arr.dtype.kind not in "fiu":
        raise TypeError("%s must be a real numeric array, got dtype %s" % (name, arr.dtype))
    if arr.shape != (channels,):
        raise ValueError("%s must have shape (%d,), got %s" % (name, channels, arr.shape))
    return np.ascontiguousarray(arr, dtype=np.float64)


def _running_statistic(a: Any, name: str, channels: int) -> Optional[np.ndarray]:
    """None, or a writable float ndarray (C,) to update in place."""
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        raise TypeError("%s must be a numpy.ndarray (it is updated in place), got %s" % (name, type(a).__name__))
    if a.dtype.kind != "f":
        raise TypeError("%s must be a float array, got dtype %s" % (name, a.dtype))
    if a.shape != (channels,):
        raise ValueError("%s must have shape (%d,), got %s" % (name, channels, a.shape))
    if not a.flags.writeable:
        raise ValueError("%s must be writable (it is updated in place)" % name)
    return a


def _finite_number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError("%s must be a number, got %r" % (name, value)) from None
    if not np.isfinite(number):
        raise ValueError("%s must be finite, got %r" % (name, number))
    return number


def _eps(eps: Any) -> float:
    value = _finite_number(eps, "eps")
    if value < 0.0:
        raise ValueError("eps must be a finite non-negative number, got %r" % value)
    return value
