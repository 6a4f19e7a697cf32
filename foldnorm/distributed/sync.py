"""The synchronized batch norm: the building blocks around one allgather per pass, and the communicator
protocol."""
from __future__ import annotations

import zlib
from typing import Any, List, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from foldnorm.kernels._validation import (as_like, as_param, check_eps, check_momentum, kernel_output,
                                          running_statistic)

from .statistics import (_gather_stats, _grad_sums_into, _merge_grad_rows, _normalize, _normalize_backward, _shard,
                         _stats_into, shard_threads)


@runtime_checkable
class Communicator(Protocol):
    """What the synchronized functions need from a communicator.

    ``rank`` is this process's index in ``range(size)``; ``allgather(obj)`` is a collective that every
    rank calls with one picklable object and that returns the list of all ranks' objects, in rank
    order. An mpi4py communicator has exactly these; `TorchDistributedComm` gives them to a
    ``torch.distributed`` process group. A communicator that also has mpi4py's buffer collective
    ``Allgather(sendbuf, recvbuf)`` exchanges the summaries through it, as float64 arrays, rather than as
    pickled objects.
    """

    rank: int
    size: int

    def allgather(self, obj: Any) -> List[Any]:
        ...


class TorchDistributedComm:
    """A ``torch.distributed`` process group (gloo on CPU) as a `Communicator`.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The group to synchronize over; the default group when None. ``torch.distributed`` must already
        be initialized (``init_process_group``).
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group first")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def allgather(self, obj: Any) -> List[Any]:
        gathered: List[Any] = [None] * self.size
        self._dist.all_gather_object(gathered, obj, group=self.group)
        return gathered


# ---------------------------------------------------------------------------------------------------
# Synchronized training forward and backward: the building blocks around one collective each.


def sync_batch_norm_train(x: np.ndarray, weight: Optional[np.ndarray], bias: Optional[np.ndarray],
                          comm: Communicator, *, running_mean: Optional[np.ndarray] = None,
                          running_var: Optional[np.ndarray] = None, momentum: float = 0.1, eps: float = 1e-5,
                          channel_axis: int = 1,
                          num_threads: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch normalization of one rank's shard with the statistics of the whole batch (training forward).

    A collective: every rank of ``comm`` calls it with its own shard. Over the n values per channel of
    all shards together: mean = sum(x) / n, var = sum((x - mean)^2) / n, invstd = 1 / sqrt(var + eps),
    and each rank gets y = (x - mean) * invstd * weight + bias for its shard, as `batch_norm_train` on
    the concatenated batch would give. One ``allgather`` of ``(count, mean, m2)`` per rank (2C + 1
    float64 values) is exchanged; every rank merges them in rank order, so mean and invstd are the same
    bits on every rank.

    running_mean and running_var, when given, are updated in place with PyTorch's convention:
    running = (1 - momentum) * running + momentum * batch, the batch variance being the whole batch's
    unbiased m2 / (n - 1) (computed in float64, stored in the arrays' dtype). Ranks usually all pass
    them, so that they stay equal everywhere.

    Parameters
    ----------
    x : ndarray
        This rank's shard: (N, C, *spatial), or (N, *spatial, C) with ``channel_axis=-1``; float16, float32
        or float64. N may differ between ranks and may be 0; the whole batch needs more than one value
        per channel.
    weight, bias : array_like (C,) or None
        1 and 0 when None.
    comm : Communicator
        An mpi4py communicator, a `TorchDistributedComm`, or any object with ``rank``, ``size`` and
        ``allgather``.
    running_mean, running_var : writable float ndarray (C,), optional
    momentum : float
        The weight of the batch statistics in the running update, in [0, 1]. Must be the same on every
        rank.
    eps : float
        Added to the variance: a finite non-negative real number, the same on every rank.
    channel_axis : {1, -1}
    num_threads : int, optional
        Threads for this rank's shard; None shares the usable cores among the ranks on this machine
        (`shard_threads`).

    Returns
    -------
    y : ndarray
        The shard normalized, of x's shape and dtype.
    mean, invstd : ndarray
        The whole batch's statistics, float64 (C,), bit-identical on every rank: pass them on to
        `sync_batch_norm_backward`.

    Raises
    ------
    TypeError, ValueError
        On every rank, when any rank's arguments are wrong (the message names the rank), when ranks
        disagree on C, eps or momentum, or when the whole batch has fewer than 2 values per channel.

    Examples
    --------
    With mpi4py, run under ``mpiexec -n 2 python train.py``, ``comm`` is ``MPI.COMM_WORLD`` and each rank
    passes its own shard. Any object with ``rank``, ``size`` and ``allgather`` serves; with one process
    the statistics are the shard's own:

    >>> import numpy as np
    >>> class OneProcess:
    ...     rank, size = 0, 1
    ...     def allgather(self, value):
    ...         return [value]
    >>> x = np.arange(24.0).reshape(2, 3, 4)
    >>> rm, rv = np.zeros(3), np.ones(3)
    >>> y, mean, invstd = sync_batch_norm_train(x, None, None, OneProcess(), running_mean=rm,
    ...                                         running_var=rv, momentum=0.5)
    >>> mean
    array([ 7.5, 11.5, 15.5])
    >>> rm
    array([3.75, 5.75, 7.75])
    """
    _check_comm(comm)

    def prepare():
        xc, dtype, layout = _shard(x, "x", channel_axis)
        channels = layout[1]
        weight64 = as_param(weight, "weight", (channels,), np.float64)
        bias64 = as_param(bias, "bias", (channels,), np.float64)
        rmean = running_statistic(running_mean, "running_mean", channels)
        rvar = running_statistic(running_var, "running_var", channels)
        if rmean is not None and rvar is not None and np.shares_memory(rmean, rvar):
            raise ValueError("running_mean and running_var must not overlap")
        momentum64 = check_momentum(momentum)
        eps64 = check_eps(eps)
        threads = shard_threads(num_threads, xc.size)
        output = kernel_output(None, xc.shape, dtype)
        row = np.empty(1 + 2 * channels)
        return ((xc, dtype, layout, weight64, bias64, rmean, rvar, threads, output), (channels, eps64, momentum64),
                row, lambda: _stats_into(xc, layout, row, threads))

    (xc, dtype, layout, weight64, bias64, rmean, rvar, threads, output), (_, eps64, momentum64), rows = _exchange(
        comm, prepare, _FORWARD_AGREED)
    count, mean, invstd = _gather_stats(rows, eps64, momentum64, rmean, rvar)
    if count < 2:
        raise ValueError("expected more than 1 value per channel when training, got %d over the %d ranks"
                         % (count, comm.size))
    y = _normalize(xc, dtype, output, layout, mean, invstd, weight64, bias64, threads)
    return y, mean, invstd


def sync_batch_norm_backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                             weight: Optional[np.ndarray], comm: Communicator, *, channel_axis: int = 1,
                             reduce_weight_grads: bool = False,
                             num_threads: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of `sync_batch_norm_train`'s y for one rank's shard (training backward).

    A collective: every rank calls it with its shard's dy and x and the mean and invstd the forward
    returned. With n values per channel in the whole batch, each rank's
    dx = weight * invstd * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n), the sums running over the
    whole batch: one ``allgather`` of ``(count, sum(dy), sum(dy * (x - mean)))`` per rank (2C + 1
    float64 values), added up in rank order on every rank.

    dweight and dbias are, by default, this shard's contributions only, as PyTorch's SyncBatchNorm
    returns them: sum(dy * xhat) and sum(dy) over the shard, so that the data-parallel reduction of all
    parameter gradients (summing or averaging them over ranks with the other layers') treats them like
    any other. With ``reduce_weight_grads=True`` they are the whole batch's (the sums over all ranks,
    the same on every rank), which the collective has already computed.

    Parameters
    ----------
    dy : ndarray
        The gradient of the loss with respect to this shard's y, of x's shape.
    x : ndarray
        This rank's shard, as passed to `sync_batch_norm_train`.
    mean, invstd : array_like (C,)
        As returned by `sync_batch_norm_train`.
    weight : array_like (C,) or None
    comm : Communicator
    channel_axis : {1, -1}
    reduce_weight_grads : bool
        Return the whole batch's dweight and dbias instead of this shard's.
    num_threads : int, optional
        As for `sync_batch_norm_train`.

    Returns
    -------
    dx : ndarray
        Of x's shape and dtype.
    dweight, dbias : ndarray
        (C,), in x's dtype.

    Raises
    ------
    TypeError, ValueError
        On every rank, when any rank's arguments are wrong, when ranks disagree on C or pass different
        mean or invstd, or when the whole batch is empty.
    """
    _check_comm(comm)

    def prepare():
        xc, dtype, layout = _shard(x, "x", channel_axis)
        channels = layout[1]
        dyc = as_like(dy, "dy", xc.shape, xc.dtype)
        mean64 = as_param(mean, "mean", (channels,), np.float64, required=True)
        invstd64 = as_param(invstd, "invstd", (channels,), np.float64, required=True)
        weight64 = as_param(weight, "weight", (channels,), np.float64)
        threads = shard_threads(num_threads, 2 * xc.size)
        # Every rank must pass the statistics the forward gave all of them; a checksum tells.
        checksum = zlib.crc32(invstd64, zlib.crc32(mean64))
        output = kernel_output(None, xc.shape, dtype)
        row = np.empty(1 + 2 * channels)
        local = (row[1:1 + channels], row[1 + channels:])  # this shard's sums, once summarized
        return ((xc, dyc, dtype, layout, mean64, invstd64, weight64, threads, output, local), (channels, checksum),
                row, lambda: _grad_sums_into(dyc, xc, layout, mean64, invstd64, row, threads))

    (xc, dyc, dtype, layout, mean64, invstd64, weight64, threads, output, local), _, rows = _exchange(
        comm, prepare, _BACKWARD_AGREED)
    total = _merge_grad_rows(rows)
    if total.count < 1:
        raise ValueError("the whole batch is empty: every rank's x has no values")
    dx = _normalize_backward(dyc, xc, dtype, output, layout, mean64, invstd64, weight64, total, threads)
    sum_dy, sum_dy_xmu = total[1:] if reduce_weight_grads else local
    return dx, (sum_dy_xmu * invstd64).astype(dtype), sum_dy.astype(dtype)


# ---------------------------------------------------------------------------------------------------
# The collective: every rank's local outcome (its summaries, or why its arguments were refused), gathered by
# every rank.


def _check_comm(comm: Any) -> None:
    if not callable(getattr(comm, "allgather", None)):
        raise TypeError("comm must be a communicator with rank, size and allgather(obj) -> list (an "
                        "mpi4py communicator, or TorchDistributedComm), got %s" % type(comm).__name__)
    rank, size = getattr(comm, "rank", None), getattr(comm, "size", None)
    if not (isinstance(rank, int) and isinstance(size, int) and 0 <= rank < size):
        raise TypeError("comm must have integer rank and size with 0 <= rank < size, got rank %r, size %r"
                        % (rank, size))


def _exchange(comm: Communicator, prepare, names: Tuple[str, ...]):
    """Check this rank's arguments and summarize its shard, gather every rank's outcome, and either return
    (local, agreed, every rank's row in rank order) or raise on every rank.

    prepare() checks the arguments and returns (local, agreed, row, summarize): `agreed` holds the numbers every
    rank must share, one per name of `names`, the number of channels C first; summarize() writes this rank's
    summary into `row`, a float64 array (1 + 2C).  What is returned, a float64 (ranks, 1 + 2C) array, is what
    the merges read.  Everything the collectives need is made before summarize() runs, so that little runs
    between the pass over the data and the collectives, with the caches cold from the data.
    """
    buffered = callable(getattr(comm, "Allgather", None))
    local = agreed = row = buffers = None
    try:
        local, agreed, row, summarize = prepare()
        if buffered:
            buffers = _buffers(comm.size, agreed, row.size)
        summarize()
        error = None
    except Exception as caught:  # every failure must reach the other ranks, or they would wait forever
        error = caught
    if buffered:
        failures, disagreeing, rows = _gather_buffers(comm, error, agreed, row, buffers, len(names))
    else:
        failures, disagreeing, rows = _gather_objects(comm, error, agreed, row)
    if error is not None:
        raise error
    if failures:
        rank, (kind, message) = failures[0]
        others = "" if len(failures) == 1 else " (and on rank %s)" % ", ".join(str(r) for r, _ in failures[1:])
        raise _EXCEPTION_TYPES.get(kind, RuntimeError)("on rank %d of %d%s: %s" % (rank, comm.size, others, message))
    if rows is None:
        for name, values in zip(names, zip(*disagreeing)):
            if any(v != values[comm.rank] for v in values):
                raise ValueError("ranks disagree on %s: %s" % (
                    name, ", ".join("%r on rank %d" % (v, r) for r, v in enumerate(values))))
    return local, agreed, rows


def _failure(error: Optional[Exception]):
    return None if error is None else (type(error).__name__, str(error))


# What the gatherers return: ([(rank, (exception type name, message)) of every rank that failed],
# every rank's agreed values when they differ, else None, and the rows when neither happened, else None.


def _gather_objects(comm: Communicator, error, agreed, row):
    """Every rank's (failure, agreed, row) through one allgather of Python objects."""
    gathered = comm.allgather((_failure(error), agreed, row))
    if len(gathered) != comm.size:
        raise RuntimeError("comm.allgather returned %d objects for %d ranks" % (len(gathered), comm.size))
    failures = [(rank, failure) for rank, (failure, _, _) in enumerate(gathered) if failure is not None]
    if failures:
        return failures, None, None
    if any(other != agreed for _, other, _ in gathered):
        return [], [other for _, other, _ in gathered], None
    return [], None, np.array([other_row for _, _, other_row in gathered])


def _buffers(ranks: int, agreed: Tuple[Any, ...], row_size: int):
    """What `_gather_buffers` sends and receives when this rank succeeds: its header (0 for "not failed", then
    the agreed values), the ranks' headers and rows to receive, and the bytes of the headers when every rank's
    is this one's."""
    header = np.array((0.0, *agreed))
    return header, np.empty((ranks, header.size)), np.empty((ranks, row_size)), header.tobytes() * ranks


def _gather_buffers(comm: Any, error, agreed, row, buffers, width: int):
    """The same through an mpi4py communicator's buffer collectives, which spare the pickling of the
    objects: an Allgather of every rank's header (failed or not, then the agreed values), then, when every
    rank succeeded with the same values (the same number of channels among them), one of the rows; the
    messages of failures go as objects."""
    if error is None:
        header, headers, rows, expected = buffers
    else:
        header, headers = np.full(1 + width, np.nan), np.empty((comm.size, 1 + width))
        header[0] = 1.0
    comm.Allgather(header, headers)
    # Every rank sees the same headers, so every rank takes the same branch.  Bytes are compared first: it costs
    # less than NumPy's comparison of a few values, and differs from it only for -0.0 and 0.0.
    if error is not None or headers.tobytes() != expected:
        if headers[:, 0].any():
            failures = comm.allgather(_failure(error))
            return [(rank, failure) for rank, failure in enumerate(failures) if failure is not None], None, None
        if (headers != header).any():
            return [], [tuple(type(value)(v) for value, v in zip(agreed, other[1:])) for other in headers], None
    comm.Allgather(row, rows)
    return [], None, rows


# The values every rank must share, in the order the buffer exchange sends them.
_FORWARD_AGREED = ("the number of channels", "eps", "momentum")
_BACKWARD_AGREED = ("the number of channels", "the checksum of mean and invstd")

_EXCEPTION_TYPES = {"TypeError": TypeError, "ValueError": ValueError, "MemoryError": MemoryError}
