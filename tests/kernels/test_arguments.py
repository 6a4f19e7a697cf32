"""Hostile scalar arguments to every public kernel: thread counts, eps, axes, momentum.

A count of threads above the usable cores is capped (never a crash, never an OverflowError); anything that
is not what the argument expects is refused with an error that names it and says what it expects.
"""
import fractions

import numpy as np
import pytest

import foldnorm
from foldnorm.kernels import runtime

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 4, 3, 5)).astype(np.float32)
DY = RNG.standard_normal(X.shape).astype(np.float32)
C = X.shape[1]


def _bn_stats():
    _, mean, invstd = foldnorm.batch_norm_train(X)
    return mean, invstd


def _ln_stats(axis=-1):
    _, mean, invstd = foldnorm.layer_norm(X, axis=axis)
    return mean, invstd


# Every public kernel, called on X with keyword arguments passed through.
KERNELS = {
    "batch_norm": lambda **kw: foldnorm.batch_norm(X, np.zeros(C), np.ones(C), **kw),
    "batch_norm_train": lambda **kw: foldnorm.batch_norm_train(X, **kw),
    "batch_norm_backward": lambda **kw: foldnorm.batch_norm_backward(DY, X, *_bn_stats(), **kw),
    "layer_norm": lambda **kw: foldnorm.layer_norm(X, **kw),
    "layer_norm_backward": lambda **kw: foldnorm.layer_norm_backward(DY, X, *_ln_stats(kw.get("axis", -1)), **kw),
    "rms_norm": lambda **kw: foldnorm.rms_norm(X, **kw),
    "rms_norm_backward": lambda **kw: foldnorm.rms_norm_backward(
        DY, X, foldnorm.rms_norm(X, axis=kw.get("axis", -1))[1], **kw),
    "group_norm": lambda **kw: foldnorm.group_norm(X, 2, **kw),
    "group_norm_backward": lambda **kw: foldnorm.group_norm_backward(
        DY, X, *foldnorm.group_norm(X, 2)[1:], 2, **kw),
    "instance_norm": lambda **kw: foldnorm.instance_norm(X, **kw),
    "instance_norm_backward": lambda **kw: foldnorm.instance_norm_backward(
        DY, X, *foldnorm.instance_norm(X)[1:], **kw),
}
WITH_EPS = ["batch_norm", "batch_norm_train", "layer_norm", "rms_norm", "group_norm", "instance_norm"]
WITH_AXIS = ["layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward"]
WITH_CHANNEL_AXIS = ["batch_norm", "batch_norm_train", "batch_norm_backward"]


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def assert_same_bits(a, b):
    a, b = _as_tuple(a), _as_tuple(b)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v)


# ---------------------------------------------------------------------------------------------------
# num_threads and set_num_threads


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("threads", [3, 40000, 100000, 2**31, 2**64, np.int64(100000), np.uint8(7)])
def test_counts_above_the_cores_are_capped(kernel, threads):
    assert_same_bits(KERNELS[kernel](num_threads=threads), KERNELS[kernel](num_threads=1))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("threads", [True, False, np.True_, 1.0, 2.5, "2", [2], np.float64(2.0)])
def test_a_count_that_is_not_an_int_is_a_type_error_naming_num_threads(kernel, threads):
    with pytest.raises(TypeError, match="^num_threads must be a positive int, got "):
        KERNELS[kernel](num_threads=threads)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("threads", [0, -1, -(2**63), np.int32(-4)])
def test_a_count_below_one_is_a_value_error_naming_num_threads(kernel, threads):
    with pytest.raises(ValueError, match="^num_threads must be a positive int, got -?[0-9]+$"):
        KERNELS[kernel](num_threads=threads)


@pytest.fixture
def default_threads_kept():
    before = foldnorm.get_num_threads()
    yield before
    foldnorm.set_num_threads(before)


@pytest.mark.parametrize("threads", [100000, 40000, 2**31, 2**64, np.int64(2**40)])
def test_set_num_threads_caps_to_the_usable_cores(default_threads_kept, threads):
    expected = {name: KERNELS[name](num_threads=1) for name in KERNELS}
    foldnorm.set_num_threads(threads)
    assert foldnorm.get_num_threads() == runtime.usable_cores()
    assert foldnorm.build_info()["max_threads"] == runtime.usable_cores()
    for name, kernel in KERNELS.items():
        assert_same_bits(kernel(), expected[name])


@pytest.mark.parametrize("bad, error", [(True, TypeError), (1.5, TypeError), ("4", TypeError), (None, TypeError),
                                        (0, ValueError), (-2, ValueError)])
def test_set_num_threads_refuses_what_is_not_a_positive_int(default_threads_kept, bad, error):
    with pytest.raises(error, match="^n must be a positive int, got "):
        foldnorm.set_num_threads(bad)
    assert foldnorm.get_num_threads() == default_threads_kept


def test_set_num_threads_takes_numpy_integers(default_threads_kept):
    foldnorm.set_num_threads(np.int16(1))
    assert foldnorm.get_num_threads() == 1


def test_usable_cores_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert runtime.usable_cores() == 3
    monkeypatch.delattr(runtime.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 6)
    assert runtime.usable_cores() == 6
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: None)
    assert runtime.usable_cores() == 1


def test_resolve_num_threads_caps_to_cores_and_to_the_work(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cores", lambda: 4)
    grain = runtime.PARALLEL_GRAIN
    assert runtime.resolve_num_threads(100000) == 4
    assert runtime.resolve_num_threads(3) == 3
    assert runtime.resolve_num_threads(100000, work=grain - 1) == 1
    assert runtime.resolve_num_threads(100000, work=0) == 1
    assert runtime.resolve_num_threads(100000, work=3 * grain) == 3
    assert runtime.resolve_num_threads(2, work=100 * grain) == 2
    assert runtime.resolve_num_threads(100000, work=100 * grain) == 4


# ---------------------------------------------------------------------------------------------------
# eps


@pytest.mark.parametrize("kernel", WITH_EPS)
@pytest.mark.parametrize("eps", [None, "abc", "1e-5", [1e-5], np.array([1e-5]), b"1", True, np.True_, 1j])
def test_eps_that_is_not_a_real_number_is_a_type_error_naming_eps(kernel, eps):
    with pytest.raises(TypeError, match="^eps must be a finite non-negative real number, got "):
        KERNELS[kernel](eps=eps)


@pytest.mark.parametrize("kernel", WITH_EPS)
@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -float("inf"), -1e-5, -1, np.float32(-1), 10**400])
def test_eps_that_is_not_finite_and_non_negative_is_a_value_error_naming_eps(kernel, eps):
    with pytest.raises(ValueError, match="^eps must be a finite non-negative real number, got "):
        KERNELS[kernel](eps=eps)


def test_a_huge_int_is_shown_shortened():
    with pytest.raises(ValueError) as caught:
        foldnorm.layer_norm(X, eps=10**400)
    assert len(str(caught.value)) < 120


@pytest.mark.parametrize("kernel", WITH_EPS)
@pytest.mark.parametrize("eps", [0, 1, np.float32(0.25), np.float64(1e-3), np.int64(2), fractions.Fraction(1, 8)])
def test_eps_takes_any_real_number(kernel, eps):
    assert_same_bits(KERNELS[kernel](eps=eps), KERNELS[kernel](eps=float(eps)))


# ---------------------------------------------------------------------------------------------------
# axis, channel_axis


@pytest.mark.parametrize("kernel", WITH_AXIS)
@pytest.mark.parametrize("axis", [1.0, -1.0, "1", None, True, np.True_, [1], np.float64(1)])
def test_an_axis_that_is_not_an_int_is_a_type_error_naming_axis(kernel, axis):
    with pytest.raises(TypeError, match="^axis must be an int, got "):
        KERNELS[kernel](axis=axis)


@pytest.mark.parametrize("kernel", WITH_AXIS)
@pytest.mark.parametrize("axis", [np.int64(2), np.int8(-2), np.uint16(1)])
def test_axis_takes_numpy_integers(kernel, axis):
    assert_same_bits(KERNELS[kernel](axis=axis), KERNELS[kernel](axis=int(axis)))


@pytest.mark.parametrize("kernel", WITH_AXIS)
@pytest.mark.parametrize("axis", [4, -5, 2**63])
def test_an_axis_out_of_range_is_a_value_error_naming_axis(kernel, axis):
    with pytest.raises(ValueError, match="^axis=%d is out of range" % axis):
        KERNELS[kernel](axis=axis)


@pytest.mark.parametrize("kernel", WITH_CHANNEL_AXIS)
@pytest.mark.parametrize("channel_axis", [1.0, -1.0, "1", None, True, np.True_, np.float32(1)])
def test_a_channel_axis_that_is_not_an_int_is_refused_naming_channel_axis(kernel, channel_axis):
    with pytest.raises(ValueError, match="^channel_axis must be 1 .channels first. or -1 .channels last."):
        KERNELS[kernel](channel_axis=channel_axis)


@pytest.mark.parametrize("kernel", WITH_CHANNEL_AXIS)
def test_channel_axis_takes_numpy_integers(kernel):
    assert_same_bits(KERNELS[kernel](channel_axis=np.int64(1)), KERNELS[kernel](channel_axis=1))


# ---------------------------------------------------------------------------------------------------
# momentum, running_var_unbiased


@pytest.mark.parametrize("momentum", ["0.1", None, [0.1], True, np.True_])
def test_momentum_that_is_not_a_real_number_is_a_type_error_naming_momentum(momentum):
    with pytest.raises(TypeError, match=r"^momentum must be a real number in \[0, 1\], got "):
        foldnorm.batch_norm_train(X, running_mean=np.zeros(C), running_var=np.ones(C), momentum=momentum)


@pytest.mark.parametrize("momentum", [float("nan"), float("inf"), 10**400, 2.0, -0.1, 1.0 + 2**-52, -1e-300])
def test_momentum_outside_zero_to_one_is_a_value_error_naming_momentum(momentum):
    running_mean, running_var = np.zeros(C), np.ones(C)
    with pytest.raises(ValueError, match=r"^momentum must be a real number in \[0, 1\], got "):
        foldnorm.batch_norm_train(X, running_mean=running_mean, running_var=running_var, momentum=momentum)
    assert not running_mean.any() and (running_var == 1).all()  # refused before anything was updated


def test_momentum_at_the_ends_keeps_the_running_or_takes_the_batch_statistics():
    x64 = X.astype(np.float64)
    n = X.size // C
    running_mean, running_var = np.full(C, 0.5), np.full(C, 2.0)
    foldnorm.batch_norm_train(X, running_mean=running_mean, running_var=running_var, momentum=0)
    assert (running_mean == 0.5).all() and (running_var == 2.0).all()
    foldnorm.batch_norm_train(X, running_mean=running_mean, running_var=running_var, momentum=1.0)
    np.testing.assert_allclose(running_mean, x64.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(running_var, x64.var(axis=(0, 2, 3)) * n / (n - 1), rtol=1e-5)


@pytest.mark.parametrize("momentum", [np.float32(0.25), np.float64(0.25), fractions.Fraction(1, 4)])
def test_momentum_takes_any_real_number(momentum):
    x64 = X.astype(np.float64)
    axes = (0, 2, 3)
    n = X.size // C
    running_mean, running_var = np.full(C, 0.5), np.full(C, 2.0)
    foldnorm.batch_norm_train(X, running_mean=running_mean, running_var=running_var, momentum=momentum)
    np.testing.assert_allclose(running_mean, 0.75 * 0.5 + 0.25 * x64.mean(axis=axes), rtol=1e-6)
    np.testing.assert_allclose(running_var, 0.75 * 2.0 + 0.25 * x64.var(axis=axes) * n / (n - 1), rtol=1e-5)


@pytest.mark.parametrize("flag", [1, 0, "False", None, 1.0])
def test_running_var_unbiased_must_be_a_bool(flag):
    with pytest.raises(TypeError, match="^running_var_unbiased must be a bool, got "):
        foldnorm.batch_norm_train(X, running_var=np.ones(C), running_var_unbiased=flag)


@pytest.mark.parametrize("flag", [False, np.False_])
def test_running_var_unbiased_false_stores_the_population_variance(flag):
    running_var = np.zeros(C)
    foldnorm.batch_norm_train(X, running_var=running_var, momentum=1.0, running_var_unbiased=flag)
    np.testing.assert_allclose(running_var, X.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-5)
