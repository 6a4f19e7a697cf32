"""Per-channel batch statistics as building blocks: local summaries, their merge in a fixed order,
normalization with given statistics, and the backward pass's sums and apply.

These need no communication: foldnorm.distributed composes them around one collective each. Each is a
thin check of its arguments (foldnorm.kernels' own checks) over a compiled block of the batch-norm kernels
(src_c/bn_blocks.h): the same statistics, apply and gradient passes as `batch_norm_train` and
`batch_norm_backward`, with float64 statistics for every dtype. Statistics are centred float64 sums merged
with Chan's update, never ``E[x^2] - E[x]^2``.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import numpy as np

try:
    from foldnorm.kernels import _batch_norm
except ImportError as missing:  # a source checkout that was never built
    raise ImportError("foldnorm.distributed runs on foldnorm's compiled kernels, which are not built here "
                      "(foldnorm.kernels._batch_norm: %s); build them with `python setup.py build_ext --inplace` "
                      "or install foldnorm" % missing) from missing
from foldnorm.kernels._validation import (as_input, as_like, as_param, channel_layout, finish_output,
                                          kernel_output)
from foldnorm.kernels.runtime import get_num_threads, resolve_num_threads, usable_cores

__all__ = ["ChannelStats", "GradSums", "local_stats", "merge_stats", "normalize", "local_grad_sums",
           "merge_grad_sums", "normalize_backward", "ranks_on_this_node", "shard_threads"]

# Where launchers say how many ranks run on this machine: MPICH's Hydra, Open MPI, torchrun.
_LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE")


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


def local_stats(x: np.ndarray, *, channel_axis: int = 1, num_threads: Optional[int] = None) -> ChannelStats:
    """Per-channel ``(count, mean, m2)`` of one shard, in float64.

    The statistics pass of `batch_norm_train`: centred sums over cache-sized pieces, merged with Chan's
    update in a fixed order (the same bits for any thread count).

    Parameters
    ----------
    x : ndarray
        (N, C, *spatial), or (N, *spatial, C) with ``channel_axis=-1``; float16, float32 or float64.
        N (or a spatial size) may be 0: an empty shard has count 0.
    channel_axis : {1, -1}
        The channel axis: 1 (channels first) or -1 (channels last).
    num_threads : int, optional
        Threads for this shard; None shares the usable cores among the ranks on this machine
        (`shard_threads`).

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
    xc, _, layout = _shard(x, "x", channel_axis)
    row = np.empty(1 + 2 * layout[1])
    _stats_into(xc, layout, row, shard_threads(num_threads, xc.size))
    return ChannelStats(*_split_row(row))


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
    count, mean, m2 = _batch_norm.bn_merge_stats(_rows(parts, "parts", "ChannelStats", ("mean", "m2")))
    return ChannelStats(int(count), mean, m2)


def normalize(x: np.ndarray, mean: np.ndarray, invstd: np.ndarray, weight: Optional[np.ndarray] = None,
              bias: Optional[np.ndarray] = None, *, channel_axis: int = 1,
              num_threads: Optional[int] = None) -> np.ndarray:
    """y = (x - mean) * invstd * weight + bias per channel, with given statistics.

    The apply pass of `batch_norm_train`, in x's precision (float32 for float16):
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
    num_threads : int, optional

    Returns
    -------
    ndarray
        y, of x's shape and dtype.
    """
    xc, dtype, (outer, channels, inner) = _shard(x, "x", channel_axis)
    mean64 = as_param(mean, "mean", (channels,), np.float64, required=True)
    invstd64 = as_param(invstd, "invstd", (channels,), np.float64, required=True)
    weight64 = as_param(weight, "weight", (channels,), np.float64)
    bias64 = as_param(bias, "bias", (channels,), np.float64)
    return _normalize(xc, dtype, kernel_output(None, xc.shape, dtype), (outer, channels, inner), mean64, invstd64,
                      weight64, bias64, shard_threads(num_threads, xc.size))


def local_grad_sums(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, *, invstd: Optional[np.ndarray] = None,
                    channel_axis: int = 1, num_threads: Optional[int] = None) -> GradSums:
    """Per-channel ``(count, sum(dy), sum(dy * (x - mean)))`` of one shard, in float64.

    The reduction pass of `batch_norm_backward`.

    Parameters
    ----------
    dy : ndarray
        The gradient of the loss with respect to y, of x's shape.
    x : ndarray
        (N, C, *spatial), or (N, *spatial, C) with ``channel_axis=-1``; float16, float32 or float64; may
        be empty.
    mean : array_like (C,)
        The mean of the whole batch (not of the shard).
    invstd : array_like (C,), optional
        The whole batch's invstd, when known: float32 sums then scale the deviations to unit size, which
        keeps the digits of values far from it (below 1e-20 or above 1e20).
    channel_axis : {1, -1}
    num_threads : int, optional

    Returns
    -------
    GradSums
    """
    xc, _, layout = _shard(x, "x", channel_axis)
    dyc = as_like(dy, "dy", xc.shape, xc.dtype)
    mean64 = as_param(mean, "mean", (layout[1],), np.float64, required=True)
    invstd64 = as_param(invstd, "invstd", (layout[1],), np.float64)
    row = np.empty(1 + 2 * layout[1])
    _grad_sums_into(dyc, xc, layout, mean64, invstd64, row, shard_threads(num_threads, 2 * xc.size))
    return GradSums(*_split_row(row))


def merge_grad_sums(parts: Sequence[GradSums]) -> GradSums:
    """Several shards' `GradSums` added up, left to right (the same bits for the same order).

    Examples
    --------
    >>> a = GradSums(2, np.array([1.0]), np.array([0.5]))
    >>> merge_grad_sums([a, GradSums(1, np.array([2.0]), np.array([-1.0]))])
    GradSums(count=3, sum_dy=array([3.]), sum_dy_xmu=array([-0.5]))
    """
    return _merge_grad_rows(_rows(parts, "parts", "GradSums", ("sum_dy", "sum_dy_xmu")))


def normalize_backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                       weight: Optional[np.ndarray], sums: GradSums, *, channel_axis: int = 1,
                       num_threads: Optional[int] = None) -> np.ndarray:
    """dx of batch norm for one shard, from the whole batch's statistics and gradient sums.

    With n = sums.count, xhat = (x - mean) * invstd:
    dx = weight * invstd * (dy - sum_dy / n - xhat * invstd * sum_dy_xmu / n),
    the apply pass of `batch_norm_backward`, in x's precision (float32 for float16):
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
    num_threads : int, optional

    Returns
    -------
    ndarray
        dx, of x's shape and dtype.
    """
    xc, dtype, layout = _shard(x, "x", channel_axis)
    dyc = as_like(dy, "dy", xc.shape, xc.dtype)
    channels = layout[1]
    mean64 = as_param(mean, "mean", (channels,), np.float64, required=True)
    invstd64 = as_param(invstd, "invstd", (channels,), np.float64, required=True)
    weight64 = as_param(weight, "weight", (channels,), np.float64)
    if not isinstance(sums, GradSums):
        raise TypeError("sums must be a GradSums, got %s" % type(sums).__name__)
    sum_dy = as_param(sums.sum_dy, "sums.sum_dy", (channels,), np.float64, required=True)
    sum_dy_xmu = as_param(sums.sum_dy_xmu, "sums.sum_dy_xmu", (channels,), np.float64, required=True)
    if int(sums.count) < 1:
        raise ValueError("sums.count must be at least 1, got %r" % (sums.count,))
    return _normalize_backward(dyc, xc, dtype, kernel_output(None, xc.shape, dtype), layout, mean64, invstd64,
                               weight64, GradSums(int(sums.count), sum_dy, sum_dy_xmu),
                               shard_threads(num_threads, 3 * xc.size))


# ---------------------------------------------------------------------------------------------------
# Threads: the ranks on one machine share its cores.


def ranks_on_this_node() -> int:
    """How many ranks of this job run on this machine, as the launcher says (MPICH's Hydra sets
    MPI_LOCALNRANKS, Open MPI OMPI_COMM_WORLD_LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE); 1 when none does."""
    for name in _LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def shard_threads(num_threads: Optional[int], work: int) -> int:
    """The threads a building block runs with on a shard of `work` elements.

    None: this rank's share of the usable cores, ``usable_cores() // ranks_on_this_node()`` (at least 1,
    at most `foldnorm.get_num_threads()`), so that the ranks on a machine never run more threads than it
    has cores; an int is taken as asked. Either way capped as every kernel call is (one thread per
    foldnorm.kernels.runtime.PARALLEL_GRAIN elements, the usable cores).
    """
    if num_threads is None:
        ranks = ranks_on_this_node()
        if ranks > 1:
            num_threads = max(1, min(get_num_threads(), usable_cores() // ranks))
    return resolve_num_threads(num_threads, work)


# ---------------------------------------------------------------------------------------------------
# The compiled blocks on checked arguments: x and dy C-contiguous in the compute dtype, seen as
# (outer, channels, inner).


def _shard(x: Any, name: str, channel_axis: int):
    """A shard checked as the kernels check x, but possibly empty: (x in the compute dtype, C-contiguous;
    the caller's dtype; (outer, channels, inner))."""
    xc, dtype = as_input(x, name, min_ndim=2, allow_empty=True)
    return xc, dtype, channel_layout(xc.shape, channel_axis, name)


def _stats_into(xc: np.ndarray, layout: Tuple[int, int, int], row: np.ndarray, threads: int) -> None:
    """row (float64, 1 + 2C) = the shard's summary: count, mean and m2."""
    _batch_norm.bn_stats(xc.reshape(-1), *layout, row, threads)


def _grad_sums_into(dyc: np.ndarray, xc: np.ndarray, layout: Tuple[int, int, int], mean: np.ndarray,
                    invstd: Optional[np.ndarray], row: np.ndarray, threads: int) -> None:
    """row (float64, 1 + 2C) = the shard's gradient summary: count, sum_dy and sum_dy_xmu."""
    scale = np.ones(layout[1]) if invstd is None else invstd
    _batch_norm.bn_backward_reduce(dyc.reshape(-1), xc.reshape(-1), *layout, mean, scale, row, threads)


def _merge_grad_rows(rows: np.ndarray) -> GradSums:
    """The shards' gradient summary rows added up in order."""
    count, sum_dy, sum_dy_xmu = _batch_norm.bn_merge_grad_sums(rows)
    return GradSums(int(count), sum_dy, sum_dy_xmu)


def _split_row(row: np.ndarray) -> Tuple[int, np.ndarray, np.ndarray]:
    """(count, first per-channel array, second) of a summary row."""
    channels = row.size // 2
    return int(row[0]), row[1:1 + channels], row[1 + channels:]


def _normalize(xc: np.ndarray, dtype: np.dtype, output: Tuple[np.ndarray, np.ndarray], layout: Tuple[int, int, int],
               mean: np.ndarray, invstd: np.ndarray, weight: Optional[np.ndarray], bias: Optional[np.ndarray],
               threads: int) -> np.ndarray:
    """y into output, what kernel_output gave for it."""
    written, out = output
    _batch_norm.bn_elemt(xc.reshape(-1), written.reshape(-1), *layout, mean, invstd, weight, bias, threads)
    return finish_output(written, out, dtype)


def _normalize_backward(dyc: np.ndarray, xc: np.ndarray, dtype: np.dtype, output: Tuple[np.ndarray, np.ndarray],
                        layout: Tuple[int, int, int], mean: np.ndarray, invstd: np.ndarray,
                        weight: Optional[np.ndarray], sums: GradSums, threads: int) -> np.ndarray:
    """dx into output, what kernel_output gave for it."""
    written, out = output
    _batch_norm.bn_backward_elemt(dyc.reshape(-1), xc.reshape(-1), written.reshape(-1), *layout, mean, invstd,
                                  sums.sum_dy, sums.sum_dy_xmu, float(sums.count), weight, threads)
    return finish_output(written, out, dtype)


def _gather_stats(rows: np.ndarray, eps: float, momentum: float, running_mean: Optional[np.ndarray],
                  running_var: Optional[np.ndarray]) -> Tuple[int, np.ndarray, np.ndarray]:
    """The ranks' summary rows (count, mean, m2) merged in rank order: (count, mean, invstd), float64 (C,), and,
    when count > 1, the running statistics updated in place (in float64, stored in the arrays' own dtype; the
    batch variance is the unbiased m2 / (count - 1))."""
    # The kernels update float64 arrays in place; others through a float64 copy.
    mean_target, var_target = _float64_target(running_mean), _float64_target(running_var)
    count, mean, invstd = _batch_norm.bn_gather_stats(rows, eps, momentum, mean_target, var_target)
    if mean_target is not running_mean:
        running_mean[...] = mean_target
    if var_target is not running_var:
        running_var[...] = var_target
    return int(count), mean, invstd


def _float64_target(running: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if running is None or (running.dtype == np.float64 and running.flags.c_contiguous):
        return running
    return np.array(running, np.float64)


def _rows(parts: Sequence[Any], name: str, kind: str, fields: Tuple[str, str]) -> np.ndarray:
    """The parts' summary rows (count, then the two fields), float64 (parts, 1 + 2C)."""
    if len(parts) == 0:
        raise ValueError("%s must hold at least one %s" % (name, kind))
    columns = [[np.asarray(getattr(part, field), dtype=np.float64) for part in parts] for field in fields]
    channels = columns[0][0].shape
    for k, values in enumerate(zip(*columns)):
        if len(channels) != 1 or any(v.shape != channels for v in values):
            raise ValueError("%s[%d] has %s of shape %s, expected %s"
                             % (name, k, " and ".join(fields), " and ".join(str(v.shape) for v in values),
                                channels))
    rows = np.empty((len(parts), 1 + 2 * channels[0]))
    rows[:, 0] = [int(part.count) for part in parts]
    rows[:, 1:1 + channels[0]] = columns[0]
    rows[:, 1 + channels[0]:] = columns[1]
    return rows
