"""float32 kernels at the edges of float32's range, against float64 references.

Values near 1e20 to 1e37 (whose squares and products leave float32's range), denormal values with eps=0
(whose inverse standard deviation leaves it), mixed-sign values near float32's maximum (whose differences
leave it) and an eps far above the variance.  Wherever the float64 answer is finite, every float32 result
must lie within 5e-4 of it, relative to the largest magnitude of that result.
"""
import numpy as np
import pytest

from foldnorm.kernels.batch_normalization import batch_norm_backward, batch_norm_train
from foldnorm.kernels.group_normalization import (
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
)
from foldnorm.kernels.layer_normalization import layer_norm, layer_norm_backward, rms_norm, rms_norm_backward
from tests.kernels.kernel_refs import (
    reference_group_norm,
    reference_group_norm_backward,
    reference_instance_norm,
    reference_instance_norm_backward,
)

RTOL = 5e-4
SHAPE = (4, 6, 5, 7)  # (N, C, H, W): layer and RMS norm normalize each sample's 210 values
GROUPS = 3


def assert_within_largest(actual, expected, what):
    """|actual - expected| <= RTOL * max|expected| everywhere, expected being finite."""
    expected = np.asarray(expected, dtype=np.float64)
    assert np.isfinite(expected).all(), "the reference of %s is not finite" % what
    actual = np.asarray(actual, dtype=np.float64)
    assert np.isfinite(actual).all(), "%s is not finite: %s" % (what, actual[~np.isfinite(actual)][:4])
    error = np.abs(actual - expected).max()
    bound = RTOL * np.abs(expected).max()
    assert error <= bound, "%s: error %.3g above %.3g (largest magnitude %.3g)" % (
        what, error, bound, np.abs(expected).max())


def ref_layer_norm(x, weight, bias, eps):
    """(y, mean, invstd) over each sample's trailing dims, in float64."""
    x = x.astype(np.float64)
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    return (x - mean) * invstd * weight + bias, mean, invstd


def ref_layer_norm_backward(dy, x, weight, eps):
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    axes = tuple(range(1, x.ndim))
    _, mean, invstd = ref_layer_norm(x, 1.0, 0.0, eps)
    xhat = (x - mean) * invstd
    g = dy * weight
    dx = invstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def ref_rms_norm(x, weight, eps):
    x = x.astype(np.float64)
    invrms = 1.0 / np.sqrt((x * x).mean(axis=tuple(range(1, x.ndim)), keepdims=True) + eps)
    return x * invrms * weight, invrms


def ref_rms_norm_backward(dy, x, weight, eps):
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    _, invrms = ref_rms_norm(x, 1.0, eps)
    g = dy * weight
    dx = invrms * g - x * invrms**3 * (g * x).mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    return dx, (dy * x * invrms).sum(axis=0)


def ref_batch_norm_train(x, weight, bias, eps):
    x = x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    return (x - mean) * invstd * weight.reshape(shape) + bias.reshape(shape), mean.ravel(), invstd.ravel()


def ref_batch_norm_backward(dy, x, weight, eps):
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    xhat = (x - mean) * invstd
    dbias, dweight = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
    dx = weight.reshape(shape) * invstd * (dy - dy.mean(axis=axes, keepdims=True)
                                           - xhat * (dy * xhat).mean(axis=axes, keepdims=True))
    return dx, dweight, dbias


def _params(rng, count, affine=True):
    """(weight, bias) near 1 and 0, or 1 and 0 exactly."""
    if not affine:
        return np.ones(count), np.zeros(count)
    return rng.uniform(0.5, 1.5, count), rng.uniform(-1.0, 1.0, count)


FORWARDS = ["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm_train"]
BACKWARDS = ["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm"]


def run_forward(kernel, x, eps, rng, affine=True):
    """[(name, ours, reference), ...] for the forward kernel on float32 x."""
    if kernel in ("layer_norm", "rms_norm"):
        weight, bias = _params(rng, x.shape[1:], affine)
        w32, b32 = weight.astype(np.float32), bias.astype(np.float32)
        if kernel == "layer_norm":
            y, mean, _ = layer_norm(x, w32, b32, axis=1, eps=eps)
            y_ref, mean_ref, _ = ref_layer_norm(x, w32.astype(np.float64), b32.astype(np.float64), eps)
            return [("y", y, y_ref), ("mean", mean, mean_ref)]
        y, _ = rms_norm(x, w32, axis=1, eps=eps)
        return [("y", y, ref_rms_norm(x, w32.astype(np.float64), eps)[0])]
    weight, bias = _params(rng, x.shape[1], affine)
    if kernel == "group_norm":
        y, mean, _ = group_norm(x, GROUPS, weight, bias, eps=eps)
        y_ref, mean_ref, _ = reference_group_norm(x, GROUPS, weight, bias, eps=eps)
    elif kernel == "instance_norm":
        y, mean, _ = instance_norm(x, weight, bias, eps=eps)
        y_ref, mean_ref, _ = reference_instance_norm(x, weight, bias, eps=eps)
    else:
        y, mean, _ = batch_norm_train(x, weight, bias, eps=eps)
        y_ref, mean_ref, _ = ref_batch_norm_train(x, weight, bias, eps)
    return [("y", y, y_ref), ("mean", mean, mean_ref)]


def run_backward(kernel, dy, x, eps, rng):
    """[(name, ours, reference), ...] for the backward kernel on float32 dy and x."""
    if kernel in ("layer_norm", "rms_norm"):
        w32 = _params(rng, x.shape[1:])[0].astype(np.float32)
        w64 = w32.astype(np.float64)
        if kernel == "layer_norm":
            _, mean, invstd = layer_norm(x, w32, axis=1, eps=eps)
            ours = layer_norm_backward(dy, x, mean, invstd, w32, axis=1)
            refs = ref_layer_norm_backward(dy, x, w64, eps)
        else:
            _, invrms = rms_norm(x, w32, axis=1, eps=eps)
            ours = rms_norm_backward(dy, x, invrms, w32, axis=1)
            refs = ref_rms_norm_backward(dy, x, w64, eps)
    else:
        weight = _params(rng, x.shape[1])[0]
        if kernel == "group_norm":
            _, mean, invstd = group_norm(x, GROUPS, weight, eps=eps)
            ours = group_norm_backward(dy, x, mean, invstd, GROUPS, weight)
            refs = reference_group_norm_backward(dy, x, GROUPS, weight, eps=eps)
        elif kernel == "instance_norm":
            _, mean, invstd = instance_norm(x, weight, eps=eps)
            ours = instance_norm_backward(dy, x, mean, invstd, weight)
            refs = reference_instance_norm_backward(dy, x, weight, eps=eps)
        else:
            _, mean, invstd = batch_norm_train(x, weight, eps=eps)
            ours = batch_norm_backward(dy, x, mean, invstd, weight)
            refs = ref_batch_norm_backward(dy, x, weight, eps)
    return list(zip(("dx", "dweight", "dbias"), ours, refs))


def spread(rng, scale, loc=0.5):
    """float32 values of mean loc * scale and standard deviation scale."""
    return (scale * rng.normal(loc, 1.0, SHAPE)).astype(np.float32)


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e36])
@pytest.mark.parametrize("kernel", BACKWARDS)
def test_backward_of_values_whose_products_leave_float32(kernel, scale):
    rng = np.random.default_rng(0)
    x = spread(rng, scale)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    for name, ours, ref in run_backward(kernel, dy, x, 1e-5, rng):
        assert_within_largest(ours, ref, "%s %s" % (kernel, name))


@pytest.mark.parametrize("scale", [1e-16, 1e-20, 1e-30])
@pytest.mark.parametrize("kernel", BACKWARDS)
def test_backward_of_tiny_values_with_eps_zero(kernel, scale):
    """Values near 1e-20 with eps=0: invstd near 1e20, so the coefficient of (x - mean) in dx, which scales as
    invstd^3 * sum(dy * (x - mean)), would overflow float32 though dx itself (near dy * invstd) does not."""
    rng = np.random.default_rng(6)
    x = spread(rng, scale)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    for name, ours, ref in run_backward(kernel, dy, x, 0.0, rng):
        assert_within_largest(ours, ref, "%s %s" % (kernel, name))


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e36])
@pytest.mark.parametrize("kernel", FORWARDS)
def test_forward_of_values_whose_squares_leave_float32(kernel, scale):
    rng = np.random.default_rng(1)
    for name, ours, ref in run_forward(kernel, spread(rng, scale), 1e-5, rng):
        assert_within_largest(ours, ref, "%s %s" % (kernel, name))


# Their inverse standard deviation itself exceeds float32 and comes back as inf, with NumPy's warning.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("kernel", FORWARDS)
def test_forward_of_denormal_values_with_eps_zero(kernel):
    """Values near 1e-41 (float32 denormals) have an inverse standard deviation near 1e41, beyond float32."""
    rng = np.random.default_rng(2)
    x = spread(rng, 1e-41)
    assert (np.abs(x[x != 0]) < np.finfo(np.float32).tiny).all()
    for name, ours, ref in run_forward(kernel, x, 0.0, rng):
        assert_within_largest(ours, ref, "%s %s" % (kernel, name))


@pytest.mark.parametrize("kernel", FORWARDS)
def test_forward_of_mixed_signs_near_the_float32_maximum(kernel):
    """x - mean of values near +-3e38 lies beyond float32's range."""
    rng = np.random.default_rng(3)
    x = (rng.choice([-1.0, 1.0], SHAPE) * rng.uniform(2.0e38, 3.4e38, SHAPE)).astype(np.float32)
    for name, ours, ref in run_forward(kernel, x, 1e-5, rng):
        assert_within_largest(ours, ref, "%s %s" % (kernel, name))


@pytest.mark.parametrize("kernel", BACKWARDS)
def test_backward_of_mixed_signs_near_the_float32_maximum(kernel):
    rng = np.random.default_rng(5)
    x = (rng.choice([-1.0, 1.0], SHAPE) * rng.uniform(2.0e38, 3.4e38, SHAPE)).astype(np.float32)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    for name, ours, ref in run_backward(kernel, dy, x, 1e-5, rng):
        assert_within_largest(ours, ref, "%s %s" % (kernel, name))


def test_layer_norm_of_three_values_near_the_float32_maximum():
    x = np.array([[3e38, 3e38, -3e38]], np.float32)
    y, mean, _ = layer_norm(x)
    y_ref, mean_ref, _ = ref_layer_norm(x, 1.0, 0.0, 1e-5)
    assert_within_largest(y, y_ref, "y")
    np.testing.assert_allclose(y[0], [2**-0.5, 2**-0.5, -(2**0.5)], rtol=1e-6)


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("kernel", FORWARDS)
def test_eps_far_above_the_variance_of_large_mean_data(kernel, affine):
    """eps=1e30 on data of mean 1e4 and spread 1e-2: the normalized values are near 1e-17, and the float32
    rounding of the mean (up to 5e-4) is a large part of the spread."""
    rng = np.random.default_rng(4)
    x = (1e4 + 1e-2 * rng.standard_normal(SHAPE)).astype(np.float32)
    for name, ours, ref in run_forward(kernel, x, 1e30, rng, affine):
        assert_within_largest(ours, ref, "%s %s" % (kernel, name))


def test_instance_norm_of_one_value_per_instance_near_the_float32_maximum():
    """Each instance is its own mean: 0 everywhere, where scaling x up by invstd = 1 / sqrt(eps) overflowed."""
    x = np.array([3e38, -3e38, 1], np.float32).reshape(1, 3, 1, 1)
    y, mean, _ = instance_norm(x)
    y_ref, mean_ref, _ = reference_instance_norm(x, eps=1e-5)
    assert np.array_equal(y_ref, np.zeros(x.shape))
    assert np.array_equal(y, np.zeros(x.shape, np.float32))
    assert_within_largest(mean, mean_ref, "mean")


def near_the_maximum(rng, ulps):
    """Values within `ulps` float32 ulps of -3.3e38: sets of them are constant (ulps=0) or nearly so."""
    base = np.float32(-3.3e38)
    steps = rng.integers(0, ulps + 1, SHAPE)
    return (base + steps * np.spacing(base)).astype(np.float32)


@pytest.mark.parametrize("ulps", [0, 2], ids=["constant", "within_2_ulps"])
@pytest.mark.parametrize("kernel", FORWARDS)
def test_forward_of_values_that_hardly_differ_near_the_float32_maximum(kernel, ulps):
    rng = np.random.default_rng(8)
    for name, ours, ref in run_forward(kernel, near_the_maximum(rng, ulps), 1e-5, rng):
        assert_within_largest(ours, ref, "%s %s" % (kernel, name))


@pytest.mark.parametrize("kernel", BACKWARDS)
def test_backward_of_constant_values_near_the_float32_maximum(kernel):
    """(Values a few ulps apart there have a mean that float32 cannot hold to the precision their dx needs.)"""
    rng = np.random.default_rng(9)
    x = near_the_maximum(rng, 0)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    for name, ours, ref in run_backward(kernel, dy, x, 1e-5, rng):
        assert_within_largest(ours, ref, "%s %s" % (kernel, name))


@pytest.mark.parametrize("scale", [1.0, 3e37])
@pytest.mark.parametrize("stat", ["mean", "invstd"])
@pytest.mark.parametrize("kernel, shape, repeat", [("group_norm", (5, 4, 2), 2), ("group_norm", (3, 4, 6), 1),
                                                   ("layer_norm", (5, 1), 1), ("layer_norm", (5, 6), 1)])
def test_a_nan_statistic_stays_in_its_group_or_row(kernel, shape, repeat, stat, scale):
    """A NaN in one group's (row's) mean or invstd makes that group's dx NaN, and no other's; at 3e37 some
    groups and rows are constant (repeat: each value twice along the last axis)."""
    rng = np.random.default_rng(10)
    x = np.repeat(scale * rng.uniform(0.5, 1.0, shape[:-1] + (shape[-1] // repeat,)), repeat, axis=-1)
    x = x.astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, shape[1])
    if kernel == "group_norm":
        groups = 2 if repeat == 1 else shape[1]
        _, mean, invstd = group_norm(x, groups, weight)
        dx_ref = reference_group_norm_backward(dy, x, groups, weight, eps=1e-5)[0]
        poisoned = (1, 1)
        run = lambda m, s: group_norm_backward(dy, x, m, s, groups, weight)[0]  # noqa: E731
        group_of = lambda a: a.reshape(shape[0], groups, -1)  # noqa: E731
    else:
        w32 = weight.astype(np.float32)
        _, mean, invstd = layer_norm(x, w32, axis=1)
        dx_ref = ref_layer_norm_backward(dy, x, w32.astype(np.float64), 1e-5)[0]
        poisoned = (1,)
        run = lambda m, s: layer_norm_backward(dy, x, m, s, w32, axis=1)[0]  # noqa: E731
        group_of = lambda a: a.reshape(shape[0], 1, -1)  # noqa: E731
    stats = {"mean": mean.astype(np.float64), "invstd": invstd.astype(np.float64)}
    stats[stat].reshape(mean.shape)[poisoned] = np.nan
    dx = group_of(run(stats["mean"], stats["invstd"]))
    index = poisoned if len(poisoned) == 2 else poisoned + (0,)
    assert np.isnan(dx[index]).all()
    others = np.ones(dx.shape[:2], bool)
    others[index] = False
    assert_within_largest(dx[others], group_of(dx_ref)[others], "%s dx of the other groups" % kernel)
