"""foldnorm.distributed's building blocks against float64 NumPy references, and the synchronized functions
in one process over a simulated communicator (one thread per rank)."""
import subprocess
import sys
import threading

import numpy as np
import pytest

import foldnorm
from foldnorm import distributed
from foldnorm.distributed import (
    ChannelStats,
    GradSums,
    local_grad_sums,
    local_stats,
    merge_grad_sums,
    merge_stats,
    normalize,
    normalize_backward,
    sync_batch_norm_backward,
    sync_batch_norm_train,
)
from sync_cases import reference

# (shape, channel_axis): 2-D to 5-D, channels first and last, one channel, one sample.
SHAPES = [((6, 3), 1), ((6, 3), -1), ((4, 5, 7), 1), ((4, 7, 5), -1), ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1),
          ((2, 3, 2, 3, 4), 1), ((5, 1, 9), 1), ((1, 4, 5, 5), 1), ((1, 5, 5, 4), -1)]
DTYPES = [np.float64, np.float32, np.float16]
RTOL = {np.float64: 1e-12, np.float32: 4 * 2.0 ** -23, np.float16: 4 * 2.0 ** -10}
# The statistics and gradient sums are float64 for every dtype: float64 data's to 1e-12, float32 and float16
# data's (summed in float32 lanes, as the kernels sum them) to a few float32 ulps.
STATS_RTOL = {np.float64: 1e-12, np.float32: 4 * 2.0 ** -23, np.float16: 4 * 2.0 ** -23}


def shape_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + ("_last" if axis == -1 else "_first")


def data(shape, dtype, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3.0 + offset).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def channel_params(channels, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(channels) + 1.0, rng.standard_normal(channels)


def reduce_axes(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis % x.ndim)


def assert_close_scaled(actual, expected, rel):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= rel * scale, "max error %g > %g" % (err, rel * scale)


# ---------------------------------------------------------------------------------------------------
# Building blocks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_local_stats_are_the_float64_statistics(case, dtype):
    shape, axis = case
    x, _ = data(shape, dtype, offset=5.0)
    stats = local_stats(x, channel_axis=axis)
    x64 = x.astype(np.float64)
    axes = reduce_axes(x, axis)
    mean = x64.mean(axis=axes)
    m2 = ((x64 - np.expand_dims(mean, axes)) ** 2).sum(axis=axes)
    assert stats.count == x.size // x.shape[axis]
    assert stats.mean.dtype == np.float64 and stats.m2.dtype == np.float64
    rtol = STATS_RTOL[dtype]
    np.testing.assert_allclose(stats.mean, mean, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(stats.m2, m2, rtol=rtol)
    np.testing.assert_allclose(stats.var(), m2 / stats.count, rtol=rtol)
    np.testing.assert_allclose(stats.unbiased_var(), m2 / (stats.count - 1), rtol=rtol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, axis", [((13, 3, 5000), 1), ((3, 1, 9000), 1), ((4000, 7), -1), ((50, 40, 3), -1)],
                         ids=["planes", "one_channel", "rows", "rows_nhwc"])
def test_local_stats_of_many_pieces_are_batch_norm_train_s(shape, axis, dtype):
    """Inputs of many cache-sized pieces: batch_norm_train's statistics pass, float64 out for float32 x."""
    x, _ = data(shape, dtype, offset=1e3)
    stats = local_stats(x, channel_axis=axis)
    x64 = x.astype(np.float64)
    axes = reduce_axes(x, axis)
    mean = x64.mean(axis=axes)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(stats.m2, ((x64 - np.expand_dims(mean, axes)) ** 2).sum(axis=axes),
                               rtol=STATS_RTOL[dtype])
    if dtype == np.float64:
        _, kernel_mean, kernel_invstd = foldnorm.batch_norm_train(x, eps=0.0, channel_axis=axis)
        assert kernel_mean.tobytes() == stats.mean.tobytes()
        np.testing.assert_allclose(stats.invstd(0.0), kernel_invstd, rtol=4 * 2.0 ** -52)


@pytest.mark.parametrize("shape, axis", [((0, 3, 4), 1), ((0, 4, 3), -1), ((2, 3, 0), 1), ((0, 3), 1)])
def test_local_stats_of_an_empty_shard(shape, axis):
    stats = local_stats(np.empty(shape, np.float32), channel_axis=axis)
    assert stats.count == 0
    assert np.array_equal(stats.mean, np.zeros(3)) and np.array_equal(stats.m2, np.zeros(3))


def test_local_stats_of_one_value_per_channel():
    stats = local_stats(np.array([[1.5, -2.0, 7.0]]))
    assert stats.count == 1
    assert np.array_equal(stats.mean, [1.5, -2.0, 7.0]) and np.array_equal(stats.m2, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("splits", [[5], [2, 3], [0, 5], [1, 0, 4, 0], [1, 1, 1, 1, 1], [0, 0, 5]])
def test_merge_stats_of_shards_equals_the_whole(splits):
    x, _ = data((5, 4, 6), np.float64, offset=100.0)
    bounds = np.cumsum([0] + splits)
    merged = merge_stats([local_stats(x[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])])
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    assert merged.count == 30
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(merged.m2, ((x64 - mean[:, None]) ** 2).sum(axis=(0, 2)), rtol=1e-12)


def test_merge_stats_is_a_fixed_left_to_right_order():
    """The same parts in the same order give the same bits; the parts' order is the only order."""
    rng = np.random.default_rng(3)
    parts = [local_stats(rng.standard_normal((int(n), 8)) * 1e3 + 1e5) for n in rng.integers(1, 9, size=6)]
    first, again = merge_stats(parts), merge_stats(list(parts))
    assert first.mean.tobytes() == again.mean.tobytes() and first.m2.tobytes() == again.m2.tobytes()
    by_hand = parts[0]
    for part in parts[1:]:
        by_hand = merge_stats([by_hand, part])
    assert by_hand.mean.tobytes() == first.mean.tobytes() and by_hand.m2.tobytes() == first.m2.tobytes()


def test_merge_of_nothing_but_empty_shards_is_empty():
    empty = ChannelStats(0, np.zeros(2), np.zeros(2))
    assert merge_stats([empty, empty]).count == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_normalize_with_given_statistics(case, dtype):
    shape, axis = case
    x, dy = data(shape, dtype)
    channels = shape[axis]
    weight, bias = channel_params(channels)
    ref_y, ref_mean, ref_invstd, *_ = reference(x, dy, weight, bias, axis, eps=1e-3)
    y = normalize(x, ref_mean, ref_invstd, weight, bias, channel_axis=axis)
    assert y.dtype == dtype and y.shape == shape
    assert_close_scaled(y, ref_y, RTOL[dtype])
    plain = normalize(x, ref_mean, ref_invstd, channel_axis=axis)
    assert_close_scaled(plain, reference(x, dy, np.ones(channels), np.zeros(channels), axis, eps=1e-3)[0], RTOL[dtype])


def test_normalize_keeps_the_digits_of_data_far_from_zero():
    """float32 values near 1e3 with std 1: y = (x - mean) * invstd to a few float32 ulps, where
    x * alpha + beta would lose about 10 bits."""
    x, dy = data((64, 2, 100), np.float32, offset=1e3)
    x = (x / 3.0 + np.float32(1e3)).astype(np.float32)
    ref_y, ref_mean, ref_invstd, *_ = reference(x, dy, np.ones(2), np.zeros(2), 1)
    assert_close_scaled(normalize(x, ref_mean, ref_invstd), ref_y, 4 * 2.0 ** -23)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_local_grad_sums(case, dtype):
    shape, axis = case
    x, dy = data(shape, dtype)
    mean = np.random.default_rng(5).standard_normal(shape[axis])
    sums = local_grad_sums(dy, x, mean, channel_axis=axis)
    axes = reduce_axes(x, axis)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    assert sums.count == x.size // shape[axis]
    assert sums.sum_dy.dtype == np.float64 and sums.sum_dy_xmu.dtype == np.float64
    # A sum's error is relative to the sum of its terms' magnitudes.
    terms = dy64 * (x64 - np.expand_dims(mean, axes))
    rtol = STATS_RTOL[dtype]
    assert np.all(np.abs(sums.sum_dy - dy64.sum(axis=axes)) <= rtol * np.abs(dy64).sum(axis=axes))
    assert np.all(np.abs(sums.sum_dy_xmu - terms.sum(axis=axes)) <= rtol * np.abs(terms).sum(axis=axes))
    with_invstd = local_grad_sums(dy, x, mean, invstd=np.full(shape[axis], 0.5), channel_axis=axis)
    assert np.all(np.abs(with_invstd.sum_dy_xmu - terms.sum(axis=axes)) <= rtol * np.abs(terms).sum(axis=axes))


def test_grad_sums_of_an_empty_shard_and_their_merge():
    empty = local_grad_sums(np.empty((0, 3)), np.empty((0, 3)), np.zeros(3))
    assert empty == (0, ) + tuple(empty[1:]) and not empty.sum_dy.any() and not empty.sum_dy_xmu.any()
    a = GradSums(2, np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.25, -1.0]))
    merged = merge_grad_sums([a, empty, a])
    assert merged.count == 4
    assert np.array_equal(merged.sum_dy, [2.0, 4.0, 6.0]) and np.array_equal(merged.sum_dy_xmu, [1.0, 0.5, -2.0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_normalize_backward_of_shards_with_the_whole_batch_sums(case, dtype):
    shape, axis = case
    x, dy = data(shape, dtype, offset=2.0)
    weight, bias = channel_params(shape[axis])
    _, ref_mean, ref_invstd, _, ref_dx, _, _ = reference(x, dy, weight, bias, axis)
    split = shape[0] // 2
    shards = [(dy[:split], x[:split]), (dy[split:], x[split:])]
    sums = merge_grad_sums([local_grad_sums(d, s, ref_mean, channel_axis=axis) for d, s in shards])
    dx = np.concatenate([normalize_backward(d, s, ref_mean, ref_invstd, weight, sums, channel_axis=axis)
                         for d, s in shards])
    assert dx.dtype == dtype and dx.shape == shape
    assert_close_scaled(dx, ref_dx, RTOL[dtype])


@pytest.mark.parametrize("call, error, message", [
    (lambda: local_stats(np.ones((4, 3)), channel_axis=0), ValueError, "channel_axis must be 1"),
    (lambda: local_stats(np.ones((4, 3)), channel_axis=True), ValueError, "channel_axis must be 1"),
    (lambda: local_stats(np.ones((4, 3), np.int32)), TypeError, "x must be a float16, float32 or float64"),
    (lambda: local_stats(np.ones(4)), ValueError, "x must have at least 2 dimensions"),
    (lambda: local_stats(np.ones((4, 0))), ValueError, "x must have at least one channel"),
    (lambda: merge_stats([]), ValueError, "parts must hold at least one"),
    (lambda: merge_stats([local_stats(np.ones((2, 3))), local_stats(np.ones((2, 4)))]), ValueError,
     r"parts\[1\] has mean and m2 of shape \(4,\) and \(4,\), expected \(3,\)"),
    (lambda: normalize(np.ones((2, 3)), np.zeros(2), np.ones(3)), ValueError, r"mean must have shape \(3,\)"),
    (lambda: normalize(np.ones((2, 3)), None, np.ones(3)), TypeError, "mean is required"),
    (lambda: normalize(np.ones((2, 3)), np.zeros(3), np.ones(3), np.array(["a", "b", "c"])), TypeError,
     "weight must be a real numeric array"),
    (lambda: local_grad_sums(np.ones((2, 4)), np.ones((2, 3)), np.zeros(3)), ValueError,
     r"dy must have shape \(2, 3\), got \(2, 4\)"),
    (lambda: normalize_backward(np.ones((2, 3)), np.ones((2, 3)), np.zeros(3), np.ones(3), None,
                                GradSums(0, np.zeros(3), np.zeros(3))), ValueError, "sums.count must be at least 1"),
    (lambda: normalize_backward(np.ones((2, 3)), np.ones((2, 3)), np.zeros(3), np.ones(3), None,
                                (2, np.zeros(3), np.zeros(3))), TypeError, "sums must be a GradSums"),
])
def test_building_blocks_name_the_bad_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------------------------------------------
# A simulated communicator: N ranks as N threads of this process


class ThreadWorld:
    """N communicators whose allgather meets at a barrier; a rank that never arrives breaks the barrier
    after a timeout instead of hanging the test."""

    def __init__(self, size, timeout=20.0):
        self.size = size
        self._slots = [None] * size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self.calls = 0

    def comm(self, rank):
        world = self

        class Comm:
            def __init__(self):
                self.rank, self.size = rank, world.size

            def allgather(self, obj):
                world._slots[rank] = obj
                world._barrier.wait()
                gathered = list(world._slots)
                if rank == 0:
                    world.calls += 1
                world._barrier.wait()
                return gathered

        return Comm()

    def run(self, job):
        """job(rank, comm) on every rank at once: [(result, None) or (None, exception)] in rank order."""
        outcomes = [None] * self.size

        def target(rank):
            try:
                outcomes[rank] = (job(rank, self.comm(rank)), None)
            except Exception as error:  # collected and judged by the test
                outcomes[rank] = (None, error)

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return outcomes


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shards, axis", [([3, 0, 5], 1), ([1, 6, 0, 2], -1), ([8], 1), ([0, 0, 2], 1)])
def test_threads_match_the_whole_batch(shards, axis, dtype):
    shape = (sum(shards), 3, 4, 5) if axis == 1 else (sum(shards), 4, 5, 3)
    x, dy = data(shape, dtype, offset=1.0)
    weight, bias = channel_params(3)
    ref_y, ref_mean, ref_invstd, ref_unbiased, ref_dx, ref_dweight, ref_dbias = reference(x, dy, weight, bias, axis)
    bounds = np.cumsum([0] + shards)
    world = ThreadWorld(len(shards))

    def job(rank, comm):
        lo, hi = bounds[rank], bounds[rank + 1]
        running_mean, running_var = np.zeros(3), np.ones(3, np.float32)
        y, mean, invstd = sync_batch_norm_train(x[lo:hi], weight, bias, comm, running_mean=running_mean,
                                                running_var=running_var, momentum=0.25, channel_axis=axis)
        dx, dweight, dbias = sync_batch_norm_backward(dy[lo:hi], x[lo:hi], mean, invstd, weight, comm,
                                                      channel_axis=axis)
        return y, mean, invstd, running_mean, running_var, dx, dweight, dbias

    outcomes = world.run(job)
    assert all(error is None for _, error in outcomes), outcomes
    results = [result for result, _ in outcomes]
    assert world.calls == 2  # one collective per pass
    rtol = RTOL[dtype]
    assert_close_scaled(np.concatenate([r[0] for r in results]), ref_y, rtol)
    assert_close_scaled(np.concatenate([r[5] for r in results]), ref_dx, rtol)
    stats_rtol = STATS_RTOL[dtype]
    for r in results:
        assert r[1].tobytes() == results[0][1].tobytes() and r[2].tobytes() == results[0][2].tobytes()
        assert_close_scaled(r[1], ref_mean, stats_rtol)
        assert_close_scaled(r[2], ref_invstd, stats_rtol)
        assert_close_scaled(r[3], 0.25 * ref_mean, stats_rtol)
        assert r[4].dtype == np.float32
        assert_close_scaled(r[4], 0.75 + 0.25 * ref_unbiased, 2 * 2.0 ** -23)
    assert_close_scaled(np.sum([r[6] for r in results], axis=0, dtype=np.float64), ref_dweight, rtol * len(shards))
    assert_close_scaled(np.sum([r[7] for r in results], axis=0, dtype=np.float64), ref_dbias, rtol * len(shards))


def test_threads_one_bad_argument_raises_on_every_rank_and_leaves_the_running_stats_alone():
    world = ThreadWorld(3)
    running = [np.zeros(4) for _ in range(3)]

    def job(rank, comm):
        x = np.random.default_rng(rank).standard_normal((5, 4))
        bias = np.zeros(4) if rank != 1 else np.zeros((4, 1))
        return sync_batch_norm_train(x, None, bias, comm, running_mean=running[rank])

    outcomes = world.run(job)
    errors = [error for _, error in outcomes]
    assert all(isinstance(error, ValueError) for error in errors), errors
    assert str(errors[1]) == r"bias must have shape (4,), got (4, 1)"
    for rank in (0, 2):
        assert str(errors[rank]) == "on rank 1 of 3: bias must have shape (4,), got (4, 1)"
    assert world.calls == 1 and not any(r.any() for r in running)


def test_threads_several_bad_ranks_are_all_named():
    world = ThreadWorld(3)

    def job(rank, comm):
        return sync_batch_norm_train(np.ones((3, 2)), None, None, comm, momentum="fast" if rank else 0.1)

    errors = [error for _, error in world.run(job)]
    assert all(isinstance(error, TypeError) for error in errors), errors
    assert str(errors[0]) == "on rank 1 of 3 (and on rank 2): momentum must be a real number in [0, 1], got 'fast'"


def test_threads_momentum_outside_zero_to_one_raises_on_every_rank_naming_it():
    world = ThreadWorld(2)
    running = [np.zeros(2) for _ in range(2)]

    def job(rank, comm):
        return sync_batch_norm_train(np.ones((3, 2)), None, None, comm, running_mean=running[rank], momentum=2.0)

    errors = [error for _, error in world.run(job)]
    assert all(isinstance(error, ValueError) for error in errors), errors
    assert [str(error) for error in errors] == ["momentum must be a real number in [0, 1], got 2.0"] * 2
    assert not any(r.any() for r in running)


@pytest.mark.parametrize("eps, error", [("1e-5", TypeError), (True, TypeError), (np.inf, ValueError),
                                        (-1e-5, ValueError)])
def test_eps_is_checked_as_the_kernels_check_it(eps, error):
    """One set of argument checks: what batch_norm_train refuses, the synchronized function refuses too."""
    x = np.ones((3, 2))
    with pytest.raises(error, match="eps must be a finite non-negative real number") as kernel:
        foldnorm.batch_norm_train(x, eps=eps)
    world = ThreadWorld(2)
    errors = [error for _, error in world.run(lambda rank, comm: sync_batch_norm_train(
        x, None, None, comm, eps=eps if rank == 1 else 1e-5))]
    assert type(errors[1]) is error and str(errors[1]) == str(kernel.value)
    assert type(errors[0]) is error and str(errors[0]) == "on rank 1 of 2: " + str(kernel.value)


def test_threads_backward_with_different_statistics_on_one_rank_raises_everywhere():
    world = ThreadWorld(2)

    def job(rank, comm):
        x = np.random.default_rng(rank).standard_normal((4, 3))
        y, mean, invstd = sync_batch_norm_train(x, None, None, comm)
        if rank == 1:
            mean, invstd = local_stats(x).mean, local_stats(x).invstd(1e-5)  # its shard's, not the batch's
        return sync_batch_norm_backward(np.ones_like(x), x, mean, invstd, None, comm)

    errors = [error for _, error in world.run(job)]
    assert all(isinstance(error, ValueError) for error in errors), errors
    assert all(str(error).startswith("ranks disagree on the checksum of mean and invstd: ") for error in errors)


def test_threads_a_failure_while_computing_reaches_every_rank(monkeypatch):
    """Not only argument checks: anything raised before the collective is shared."""
    world = ThreadWorld(2)
    real = distributed.sync._stats_into

    def stats_into(xc, *layout_row_and_threads):
        if xc.shape[0] == 1:
            raise MemoryError("no room")
        return real(xc, *layout_row_and_threads)

    monkeypatch.setattr(distributed.sync, "_stats_into", stats_into)

    def job(rank, comm):
        return sync_batch_norm_train(np.ones((1 if rank else 3, 2)), None, None, comm)

    errors = [error for _, error in world.run(job)]
    assert isinstance(errors[1], MemoryError) and str(errors[1]) == "no room"
    assert isinstance(errors[0], MemoryError) and str(errors[0]) == "on rank 1 of 2: no room"


def test_communicator_is_checked_before_any_collective():
    x = np.ones((3, 2))
    with pytest.raises(TypeError, match="comm must be a communicator with rank, size and allgather"):
        sync_batch_norm_train(x, None, None, object())

    class NoRank:
        size = 2

        def allgather(self, obj):
            raise AssertionError("must not be called")

    with pytest.raises(TypeError, match="comm must have integer rank and size"):
        sync_batch_norm_train(x, None, None, NoRank())

    class Short:
        rank, size = 0, 2

        def allgather(self, obj):
            return [obj]

    with pytest.raises(RuntimeError, match="comm.allgather returned 1 objects for 2 ranks"):
        sync_batch_norm_backward(x, x, np.zeros(2), np.ones(2), None, Short())


def test_one_rank_needs_no_mpi():
    class Alone:
        rank, size = 0, 1

        def allgather(self, obj):
            return [obj]

    x, dy = data((6, 3, 4), np.float64)
    ref_y, ref_mean, ref_invstd, _, ref_dx, ref_dweight, ref_dbias = reference(x, dy, np.ones(3), np.zeros(3), 1)
    y, mean, invstd = sync_batch_norm_train(x, None, None, Alone())
    dx, dweight, dbias = sync_batch_norm_backward(dy, x, mean, invstd, None, Alone())
    assert_close_scaled(y, ref_y, 1e-12)
    assert_close_scaled(dx, ref_dx, 1e-12)
    assert_close_scaled(dweight, ref_dweight, 1e-12)
    assert_close_scaled(dbias, ref_dbias, 1e-12)
    assert isinstance(Alone(), distributed.Communicator)


def test_importing_the_module_imports_no_communication_library():
    code = ("import sys; sys.modules['mpi4py'] = None; import foldnorm.distributed; "
            "assert 'torch' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_importing_without_the_compiled_kernels_is_a_clear_import_error():
    code = ("import sys; sys.modules['foldnorm.kernels._batch_norm'] = None\n"
            "try:\n    import foldnorm.distributed\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("foldnorm.distributed runs on foldnorm's compiled kernels, which are not built"), \
        out.stdout


@pytest.mark.parametrize("variable", ["MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE"])
def test_ranks_on_a_machine_share_its_cores(monkeypatch, variable):
    from foldnorm.kernels import runtime

    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    monkeypatch.setattr(distributed.statistics, "usable_cores", lambda: 8)
    monkeypatch.setattr(distributed.statistics, "get_num_threads", lambda: 8)
    big = 1 << 30
    assert distributed.ranks_on_this_node() == 1
    assert distributed.shard_threads(None, big) == runtime.resolve_num_threads(None, big)
    monkeypatch.setenv(variable, "3")
    assert distributed.ranks_on_this_node() == 3
    assert distributed.shard_threads(None, big) == 2  # 8 cores // 3 ranks
    monkeypatch.setenv(variable, "16")
    assert distributed.shard_threads(None, big) == 1
    assert distributed.shard_threads(5, big) == 5  # asked for: used as given
    assert distributed.shard_threads(None, 100) == 1  # a small shard runs on the calling thread
    monkeypatch.setenv(variable, "not a number")
    assert distributed.ranks_on_this_node() == 1


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, axis", [((8, 16, 40, 40), 1), ((6000, 24), -1)], ids=["planes", "rows"])
def test_building_blocks_give_the_same_bits_for_any_thread_count(shape, axis, dtype, monkeypatch):
    from foldnorm.kernels import runtime

    monkeypatch.setattr(runtime, "PARALLEL_GRAIN", 1)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    x, dy = data(shape, dtype, offset=2.0)
    weight, bias = channel_params(shape[axis])

    def run(threads):
        stats = local_stats(x, channel_axis=axis, num_threads=threads)
        invstd = stats.invstd(1e-5)
        y = normalize(x, stats.mean, invstd, weight, bias, channel_axis=axis, num_threads=threads)
        sums = local_grad_sums(dy, x, stats.mean, invstd=invstd, channel_axis=axis, num_threads=threads)
        dx = normalize_backward(dy, x, stats.mean, invstd, weight, sums, channel_axis=axis, num_threads=threads)
        return [stats.mean, stats.m2, y, sums.sum_dy, sums.sum_dy_xmu, dx]

    one = run(1)
    for threads in (2, 3, 8):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(run(threads), one)), threads


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, axis", [((8, 16, 40, 40), 1), ((600, 24), -1)], ids=["planes", "rows"])
def test_building_blocks_are_the_single_process_kernels_pieces(shape, axis, dtype):
    """On the whole batch, the blocks' dx is batch_norm_backward's bit for bit, given the same statistics."""
    x, dy = data(shape, dtype, offset=2.0)
    weight, _ = channel_params(shape[axis])
    stats = local_stats(x, channel_axis=axis)
    invstd = stats.invstd(1e-5)
    sums = local_grad_sums(dy, x, stats.mean, invstd=invstd, channel_axis=axis)
    dx = normalize_backward(dy, x, stats.mean, invstd, weight, sums, channel_axis=axis)
    kernel_dx, kernel_dweight, kernel_dbias = foldnorm.batch_norm_backward(dy, x, stats.mean, invstd, weight,
                                                                           channel_axis=axis)
    assert dx.tobytes() == kernel_dx.tobytes()
    if dtype == np.float64:
        assert kernel_dbias.tobytes() == sums.sum_dy.tobytes()
        assert kernel_dweight.tobytes() == (sums.sum_dy_xmu * invstd).tobytes()
