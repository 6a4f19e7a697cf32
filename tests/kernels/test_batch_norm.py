"""batch_norm, batch_norm_train and batch_norm_backward against a float64 NumPy reference, finite
differences, onnxruntime and the ONNX backend node test data."""
import numpy as np
import pytest
from onnx import TensorProto

from foldnorm.kernels import runtime
from foldnorm.kernels.batch_normalization import batch_norm, batch_norm_backward, batch_norm_train
from tests.onnx_cases import backend_node_cases, node_attributes, run_ort, single_node_model

DTYPES = [np.float64, np.float32, np.float16]

# Absolute tolerance per unit of the result's magnitude (max(1, |expected|)).
TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 1.5e-2}

# (shape, channel_axis): 0 to 3 spatial dims, odd sizes, C = 1, N = 1, C not a multiple of 8, planes
# longer than one statistics block, and channels-last inputs with many row blocks.
FIXED_SHAPES = [
    ((5, 3), 1),
    ((5, 3), -1),
    ((4, 6, 9), 1),
    ((4, 9, 6), -1),
    ((3, 13, 7, 5), 1),
    ((3, 7, 5, 13), -1),
    ((2, 3, 4, 3, 5), 1),
    ((2, 4, 3, 5, 3), -1),
    ((4, 1, 7, 5), 1),
    ((4, 7, 5, 1), -1),
    ((1, 5, 7, 5), 1),
    ((1, 7, 5, 5), -1),
    ((2, 3, 50, 45), 1),
    ((7, 31, 10, 9), -1),
    ((3, 300), -1),
]


def _random_shapes(count, seed=20240611):
    rng = np.random.default_rng(seed)
    shapes = []
    while len(shapes) < count:
        spatial = tuple(int(d) for d in rng.integers(1, 10, size=rng.integers(0, 4)))
        n, c = int(rng.integers(1, 6)), int(rng.integers(1, 18))
        axis = int(rng.choice([1, -1]))
        shape = (n, c) + spatial if axis == 1 else (n,) + spatial + (c,)
        if n * int(np.prod(spatial)) > 1:
            shapes.append((shape, axis))
    return shapes


SHAPES = FIXED_SHAPES + _random_shapes(8)


def shape_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + ("_last" if axis == -1 else "_first")


# ---------------------------------------------------------------------------------------------------
# float64 NumPy reference


def channel_of(ndim, channel_axis):
    return channel_axis % ndim


def reduce_axes(ndim, channel_axis):
    return tuple(i for i in range(ndim) if i != channel_of(ndim, channel_axis))


def per_channel(v, ndim, channel_axis):
    shape = [1] * ndim
    shape[channel_of(ndim, channel_axis)] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def reference_stats(x, channel_axis):
    """Mean and biased variance per channel, in float64.

    NumPy sums strided axes one by one, so the mean is corrected by the mean of the residuals.
    """
    x64 = np.asarray(x, dtype=np.float64)
    axes = reduce_axes(x.ndim, channel_axis)
    first = x64.mean(axis=axes)
    residual = x64 - per_channel(first, x.ndim, channel_axis)
    mean = first + residual.mean(axis=axes)
    var = ((x64 - per_channel(mean, x.ndim, channel_axis)) ** 2).mean(axis=axes)
    return mean, var


def reference_normalize(x, mean, var, weight, bias, eps, channel_axis):
    x64 = np.asarray(x, dtype=np.float64)
    c = x.shape[channel_of(x.ndim, channel_axis)]
    weight = np.ones(c) if weight is None else weight
    bias = np.zeros(c) if bias is None else bias
    mean, var, weight, bias = (per_channel(v, x.ndim, channel_axis) for v in (mean, var, weight, bias))
    return (x64 - mean) / np.sqrt(var + eps) * weight + bias


def reference_backward(dy, x, mean, invstd, weight, channel_axis):
    """Analytic gradients of y = (x - mean) * invstd * weight + bias with batch statistics."""
    dy64 = np.asarray(dy, dtype=np.float64)
    x64 = np.asarray(x, dtype=np.float64)
    c = x.shape[channel_of(x.ndim, channel_axis)]
    weight = np.ones(c) if weight is None else weight
    axes = reduce_axes(x.ndim, channel_axis)
    n = x.size // c
    mean, invstd, weight = (per_channel(v, x.ndim, channel_axis) for v in (mean, invstd, weight))
    xhat = (x64 - mean) * invstd
    dbias = dy64.sum(axis=axes)
    dweight = (dy64 * xhat).sum(axis=axes)
    dx = weight * invstd * (dy64 - per_channel(dbias, x.ndim, channel_axis) / n
                            - xhat * per_channel(dweight, x.ndim, channel_axis) / n)
    return dx, dweight, dbias


def assert_close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCE[np.dtype(dtype)] * scale
    expected = np.asarray(expected, dtype=np.float64)
    atol = tol * max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=tol, atol=atol,
                               equal_nan=True)


def make_inputs(shape, channel_axis, dtype, seed=0, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    c = shape[channel_of(len(shape), channel_axis)]
    x = (rng.standard_normal(shape) * scale + loc).astype(dtype)
    weight = rng.uniform(0.5, 1.5, c)
    bias = rng.standard_normal(c)
    return x, weight, bias


# ---------------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_batch_norm_matches_reference(case, dtype):
    shape, axis = case
    x, weight, bias = make_inputs(shape, axis, dtype, seed=1)
    c = weight.size
    rng = np.random.default_rng(2)
    running_mean = rng.standard_normal(c)
    running_var = rng.uniform(0.5, 4.0, c)
    y = batch_norm(x, running_mean, running_var, weight, bias, eps=1e-3, channel_axis=axis)
    assert y.dtype == dtype and y.shape == shape
    expected = reference_normalize(x, running_mean, running_var, weight, bias, 1e-3, axis)
    assert_close(y, expected, dtype)
    y_plain = batch_norm(x, running_mean, running_var, channel_axis=axis)
    assert_close(y_plain, reference_normalize(x, running_mean, running_var, None, None, 1e-5, axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_batch_norm_train_matches_reference(case, dtype):
    shape, axis = case
    x, weight, bias = make_inputs(shape, axis, dtype, seed=3)
    y, mean, invstd = batch_norm_train(x, weight, bias, eps=1e-4, channel_axis=axis)
    compute = np.float64 if dtype == np.float64 else np.float32
    assert y.dtype == dtype and mean.dtype == compute and invstd.dtype == compute
    ref_mean, ref_var = reference_stats(x, axis)
    assert_close(mean, ref_mean, compute)
    assert_close(invstd, 1.0 / np.sqrt(ref_var + 1e-4), compute)
    assert_close(y, reference_normalize(x, ref_mean, ref_var, weight, bias, 1e-4, axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_batch_norm_backward_matches_reference(case, dtype):
    shape, axis = case
    x, weight, _ = make_inputs(shape, axis, dtype, seed=4)
    dy = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    _, mean, invstd = batch_norm_train(x, weight, channel_axis=axis)
    dx, dweight, dbias = batch_norm_backward(dy, x, mean, invstd, weight, channel_axis=axis)
    assert dx.dtype == dweight.dtype == dbias.dtype == dtype
    assert dx.shape == shape and dweight.shape == dbias.shape == (weight.size,)
    ref_dx, ref_dweight, ref_dbias = reference_backward(dy, x, mean, invstd, weight, axis)
    # dx cancels dy against its channel mean, which costs a few digits for float16 and float32.
    assert_close(dx, ref_dx, dtype, scale=4.0)
    assert_close(dweight, ref_dweight, dtype)
    assert_close(dbias, ref_dbias, dtype)


@pytest.mark.parametrize("case", [((2, 3, 4), 1), ((3, 2, 2, 3), -1), ((4, 2), 1), ((5, 1, 3), 1)],
                         ids=shape_id)
def test_backward_matches_finite_differences(case):
    shape, axis = case
    x, weight, bias = make_inputs(shape, axis, np.float64, seed=6)
    g = np.random.default_rng(7).standard_normal(shape)

    def loss(x_, weight_, bias_):
        y, _, _ = batch_norm_train(x_, weight_, bias_, eps=1e-3, channel_axis=axis)
        return float(np.sum(y * g))

    def numeric_gradient(f, a, h=1e-6):
        grad = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            step = np.zeros_like(a)
            step[i] = h
            grad[i] = (f(a + step) - f(a - step)) / (2 * h)
        return grad

    _, mean, invstd = batch_norm_train(x, weight, bias, eps=1e-3, channel_axis=axis)
    dx, dweight, dbias = batch_norm_backward(g, x, mean, invstd, weight, channel_axis=axis)
    np.testing.assert_allclose(dx, numeric_gradient(lambda a: loss(a, weight, bias), x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dweight, numeric_gradient(lambda w: loss(x, w, bias), weight), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(dbias, numeric_gradient(lambda b: loss(x, weight, b), bias), rtol=1e-5,
                               atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Adversarial data and precision


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_large_mean_small_std(axis, dtype):
    shape = (6, 5, 9, 7) if axis == 1 else (6, 9, 7, 5)
    x, weight, bias = make_inputs(shape, axis, dtype, seed=8, loc=1e4, scale=1e-2)
    y, mean, invstd = batch_norm_train(x, weight, bias, channel_axis=axis)
    ref_mean, ref_var = reference_stats(x, axis)
    assert_close(mean, ref_mean, dtype)
    assert_close(invstd, 1.0 / np.sqrt(ref_var + 1e-5), dtype)
    assert_close(y, reference_normalize(x, ref_mean, ref_var, weight, bias, 1e-5, axis), dtype)
    dy = np.random.default_rng(9).standard_normal(shape).astype(dtype)
    dx, dweight, dbias = batch_norm_backward(dy, x, mean, invstd, weight, channel_axis=axis)
    ref_dx, ref_dweight, ref_dbias = reference_backward(dy, x, mean, invstd, weight, axis)
    assert_close(dx, ref_dx, dtype, scale=4.0)
    assert_close(dweight, ref_dweight, dtype)
    assert_close(dbias, ref_dbias, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_mean_inference_is_one_multiply_add(dtype):
    # y = x * alpha + beta rounds x * alpha, which is about mean * alpha (1e6 here): the float32 error is
    # a few ulps of that product, as in PyTorch's inference kernel; float64 stays exact to ~1e-10.
    x, weight, bias = make_inputs((4, 3, 5, 5), 1, dtype, seed=10, loc=1e4, scale=1e-2)
    running_mean, running_var = np.full(3, 1e4), np.full(3, 1e-4)
    y = batch_norm(x, running_mean, running_var, weight, bias, eps=0.0)
    expected = reference_normalize(x, running_mean, running_var, weight, bias, 0.0, 1)
    product_scale = 1e4 * weight.max() / 1e-2
    tol = 4 * np.finfo(dtype).eps * product_scale
    np.testing.assert_allclose(y, expected, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_constant_channels_give_bias(axis, dtype):
    shape = (3, 4, 6, 5) if axis == 1 else (3, 6, 5, 4)
    values = np.array([3.25, -1e4, 0.0, 7e-3], dtype=dtype)
    x = np.broadcast_to(per_channel(values, 4, axis), shape).astype(dtype)
    bias = np.array([0.5, -2.0, 1.0, 3.0])
    y, mean, invstd = batch_norm_train(x, np.full(4, 2.0), bias, channel_axis=axis)
    np.testing.assert_array_equal(y, np.broadcast_to(per_channel(bias, 4, axis), shape).astype(dtype))
    np.testing.assert_array_equal(mean, values)
    np.testing.assert_allclose(invstd, 1.0 / np.sqrt(1e-5), rtol=1e-6)
    dx, dweight, dbias = batch_norm_backward(np.ones(shape, dtype), x, mean, invstd, channel_axis=axis)
    np.testing.assert_array_equal(dx, 0.0)
    np.testing.assert_array_equal(dweight, 0.0)
    np.testing.assert_array_equal(dbias, x.size // 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_values_near_1e30_do_not_overflow(axis, dtype):
    shape = (4, 3, 6, 7) if axis == 1 else (4, 6, 7, 3)
    x, weight, bias = make_inputs(shape, axis, dtype, seed=11, loc=1e30, scale=3e29)
    y, mean, invstd = batch_norm_train(x, weight, bias, channel_axis=axis)
    ref_mean, ref_var = reference_stats(x, axis)
    assert np.all(np.isfinite(y))
    assert_close(mean / 1e30, ref_mean / 1e30, dtype)
    assert_close(invstd * 1e29, 1e29 / np.sqrt(ref_var + 1e-5), dtype)
    assert_close(y, reference_normalize(x, ref_mean, ref_var, weight, bias, 1e-5, axis), dtype)
    dy = np.random.default_rng(12).standard_normal(shape).astype(dtype)
    dx, dweight, dbias = batch_norm_backward(dy, x, mean, invstd, weight, channel_axis=axis)
    ref_dx, ref_dweight, ref_dbias = reference_backward(dy, x, mean, invstd, weight, axis)
    assert_close(dx * 1e30, ref_dx * 1e30, dtype, scale=4.0)
    assert_close(dweight, ref_dweight, dtype)
    y_frozen = batch_norm(x, ref_mean, ref_var, weight, bias, channel_axis=axis)
    assert np.all(np.isfinite(y_frozen))


@pytest.mark.parametrize("scale,eps", [(1e-22, 0.0), (1e20, 1e-5)])
def test_backward_of_extreme_magnitudes_float32(scale, eps):
    """dy and x near 1e-22 (products below float32's range) and near 1e20 (products beyond it)."""
    x, weight, _ = make_inputs((4, 3, 6, 7), 1, np.float32, seed=13, loc=0.0, scale=1.0)
    x = (x.astype(np.float64) * scale).astype(np.float32)
    dy = (np.random.default_rng(14).standard_normal(x.shape) * scale).astype(np.float32)
    _, mean, invstd = batch_norm_train(x, weight, eps=eps)
    actual = batch_norm_backward(dy, x, mean, invstd, weight)
    expected = reference_backward(dy, x, mean, invstd, weight, 1)
    for got, want in zip(actual, expected):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("axis", [1, -1])
def test_nan_and_inf_propagate_like_numpy(axis, bad):
    shape = (3, 4, 5, 6) if axis == 1 else (3, 5, 6, 4)
    x, weight, bias = make_inputs(shape, axis, np.float32, seed=13)
    index = (1, 2, 3, 4) if axis == 1 else (1, 3, 4, 2)
    x[index] = bad
    bad_channel = index[channel_of(4, axis)]
    with np.errstate(all="ignore"):
        y, mean, invstd = batch_norm_train(x, weight, bias, channel_axis=axis)
        ref_mean, ref_var = reference_stats(x, axis)
        expected = reference_normalize(x, ref_mean, ref_var, weight, bias, 1e-5, axis)
        assert_close(y, expected, np.float32)
        assert not np.isfinite(mean[bad_channel])
        assert np.isfinite(np.delete(mean, bad_channel)).all()

        running_mean, running_var = np.zeros(4), np.ones(4)
        frozen = batch_norm(x, running_mean, running_var, weight, bias, channel_axis=axis)
        assert_close(frozen, reference_normalize(x, running_mean, running_var, weight, bias, 1e-5, axis),
                     np.float32)

        # Finite statistics in float32, as batch_norm_train returns them for a clean batch.
        _, clean_mean, invstd_clean = batch_norm_train(np.where(np.isfinite(x), x, 0), channel_axis=axis)
        dy = np.ones(shape, np.float32)
        dx, dweight, dbias = batch_norm_backward(dy, x, clean_mean, invstd_clean, weight, channel_axis=axis)
        ref_dx, ref_dweight, ref_dbias = reference_backward(dy, x, clean_mean, invstd_clean, weight, axis)
        assert_close(dx, ref_dx, np.float32, scale=4.0)
        assert_close(dweight, ref_dweight, np.float32)
        assert_close(dbias, ref_dbias, np.float32)


@pytest.mark.parametrize("axis", [1, -1])
def test_float32_channel_of_a_million_values_is_accurate(axis):
    rng = np.random.default_rng(14)
    shape = (4, 2, 500, 500) if axis == 1 else (4, 500, 500, 2)
    x = (rng.standard_normal(shape) + 1e3).astype(np.float32)
    y, mean, invstd = batch_norm_train(x, channel_axis=axis)
    ref_mean, ref_var = reference_stats(x, axis)
    error = np.abs(y - reference_normalize(x, ref_mean, ref_var, None, None, 1e-5, axis)).max()
    assert error < 5e-5


# ---------------------------------------------------------------------------------------------------
# Running statistics


@pytest.mark.parametrize("stat_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
def test_running_statistics_update_in_place(axis, unbiased, stat_dtype):
    shape = (5, 3, 4, 2) if axis == 1 else (5, 4, 2, 3)
    x, weight, bias = make_inputs(shape, axis, np.float32, seed=15)
    rng = np.random.default_rng(16)
    old_mean, old_var = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    running_mean, running_var = old_mean.astype(stat_dtype), old_var.astype(stat_dtype)
    mean_ref, var_ref = running_mean, running_var
    batch_norm_train(x, weight, bias, running_mean=running_mean, running_var=running_var, momentum=0.3,
                     running_var_unbiased=unbiased, channel_axis=axis)
    assert running_mean is mean_ref and running_var is var_ref and running_mean.dtype == stat_dtype
    batch_mean, batch_var = reference_stats(x, axis)
    n = x.size // 3
    stored_var = batch_var * n / (n - 1) if unbiased else batch_var
    old_mean, old_var = old_mean.astype(stat_dtype), old_var.astype(stat_dtype)
    np.testing.assert_allclose(running_mean, 0.7 * old_mean + 0.3 * batch_mean, rtol=1e-6)
    np.testing.assert_allclose(running_var, 0.7 * old_var + 0.3 * stored_var, rtol=1e-6)


@pytest.mark.parametrize("momentum_onnx", [0.9, 0.25])
def test_momentum_mapping_matches_onnxruntime_training_mode(momentum_onnx):
    rng = np.random.default_rng(17)
    x = (rng.standard_normal((4, 3, 5, 6)) * 1.5 + 0.5).astype(np.float32)
    scale, b = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    mean, var = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    model = single_node_model(
        "BatchNormalization",
        [("x", x), ("scale", scale), ("b", b), ("mean", mean), ("var", var)],
        [("y", TensorProto.FLOAT), ("running_mean", TensorProto.FLOAT), ("running_var", TensorProto.FLOAT)],
        opset=15,
        attrs={"training_mode": 1, "momentum": momentum_onnx, "epsilon": 1e-4},
    )
    y_ort, mean_ort, var_ort = run_ort(model, {"x": x, "scale": scale, "b": b, "mean": mean, "var": var}).values()
    running_mean, running_var = mean.copy(), var.copy()
    y, _, _ = batch_norm_train(x, scale, b, running_mean=running_mean, running_var=running_var,
                               momentum=1 - momentum_onnx, running_var_unbiased=False, eps=1e-4)
    np.testing.assert_allclose(y, y_ort, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(running_mean, mean_ort, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(running_var, var_ort, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# onnxruntime and the ONNX backend node tests


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 7), (2, 5, 3, 2, 4)])
def test_inference_matches_onnxruntime(shape, dtype):
    rng = np.random.default_rng(18)
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    scale, b = rng.uniform(0.5, 1.5, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    mean, var = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    model = single_node_model(
        "BatchNormalization",
        [("x", x), ("scale", scale), ("b", b), ("mean", mean), ("var", var)],
        [("y", elem)],
        opset=15,
        attrs={"epsilon": 1e-3},
    )
    (expected,) = run_ort(model, {"x": x, "scale": scale, "b": b, "mean": mean, "var": var}).values()
    assert_close(batch_norm(x, mean, var, scale, b, eps=1e-3), expected, dtype)


BACKEND_CASES = backend_node_cases("test_batchnorm")


def test_backend_cases_are_present():
    names = {name for name, _, _, _ in BACKEND_CASES}
    assert any("training_mode" in name for name in names)
    assert any("training_mode" not in name for name in names)


@pytest.mark.parametrize("case", BACKEND_CASES, ids=[case[0] for case in BACKEND_CASES])
def test_onnx_backend_node_case(case):
    _, node, inputs, expected = case
    attrs = node_attributes(node)
    x, scale, b, mean, var = inputs
    eps = attrs.get("epsilon", 1e-5)
    if attrs.get("training_mode", 0):
        running_mean, running_var = mean.copy(), var.copy()
        y, _, _ = batch_norm_train(x, scale, b, running_mean=running_mean, running_var=running_var,
                                   momentum=1 - attrs.get("momentum", 0.9), running_var_unbiased=False,
                                   eps=eps)
        outputs = [y, running_mean, running_var]
    else:
        outputs = [batch_norm(x, mean, var, scale, b, eps=eps)]
    assert len(expected) <= len(outputs)
    for actual, want in zip(outputs, expected):
        assert actual.dtype == want.dtype
        np.testing.assert_allclose(actual, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Threads, layouts in memory, out=


def _many_unit_inputs(axis, dtype):
    shape = (6, 10, 47, 53) if axis == 1 else (6, 47, 53, 10)
    x, weight, bias = make_inputs(shape, axis, dtype, seed=19, loc=3.0)
    dy = np.random.default_rng(20).standard_normal(shape).astype(dtype)
    return x, weight, bias, dy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_one_and_two_threads_are_bit_identical(axis, dtype):
    x, weight, bias, dy = _many_unit_inputs(axis, dtype)
    c = weight.size
    results = []
    for threads in (1, 2):
        y = batch_norm(x, np.full(c, 0.5), np.full(c, 2.0), weight, bias, channel_axis=axis,
                       num_threads=threads)
        trained = batch_norm_train(x, weight, bias, channel_axis=axis, num_threads=threads)
        grads = batch_norm_backward(dy, x, trained[1], trained[2], weight, channel_axis=axis,
                                    num_threads=threads)
        results.append((y,) + trained + grads)
    for one, two in zip(*results):
        assert np.array_equal(one, two)


def test_threadpoolctl_limits_the_kernels():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x, weight, bias, _ = _many_unit_inputs(1, np.float32)
    expected = batch_norm_train(x, weight, bias, num_threads=1)[0]
    with threadpoolctl.threadpool_limits(1):
        assert runtime.get_num_threads() == 1
        limited = batch_norm_train(x, weight, bias)[0]
    assert np.array_equal(limited, expected)


@pytest.mark.parametrize("view", ["reversed_channels", "reversed_batch", "transposed_spatial",
                                  "channels_last_view", "strided"])
def test_non_contiguous_inputs(view):
    rng = np.random.default_rng(21)
    base = rng.standard_normal((4, 6, 5, 8)) * 2 + 1
    axis = 1
    if view == "reversed_channels":
        x = base[:, ::-1]
    elif view == "reversed_batch":
        x = base[::-1]
    elif view == "transposed_spatial":
        x = base.transpose(0, 1, 3, 2)
    elif view == "channels_last_view":
        x, axis = base.transpose(0, 2, 3, 1), -1
    else:
        x = base[:, :, ::2, 1::3]
    assert not x.flags.c_contiguous
    c = x.shape[channel_of(x.ndim, axis)]
    weight, bias = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    y, mean, invstd = batch_norm_train(x, weight, bias, channel_axis=axis)
    ref_mean, ref_var = reference_stats(x, axis)
    assert_close(y, reference_normalize(x, ref_mean, ref_var, weight, bias, 1e-5, axis), np.float64)
    frozen = batch_norm(x, ref_mean, ref_var, weight, bias, channel_axis=axis)
    assert_close(frozen, reference_normalize(x, ref_mean, ref_var, weight, bias, 1e-5, axis), np.float64)
    dy = rng.standard_normal(x.shape)[..., ::-1]
    grads = batch_norm_backward(dy, x, mean, invstd, weight, channel_axis=axis)
    for actual, expected in zip(grads, reference_backward(dy, x, mean, invstd, weight, axis)):
        assert_close(actual, expected, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_out_is_filled_and_returned(contiguous, dtype):
    x, weight, bias = make_inputs((3, 4, 5, 6), 1, dtype, seed=22)
    holder = np.full((3, 4, 5, 12), 7.0, dtype=dtype)
    out = np.empty_like(x) if contiguous else holder[..., ::2]
    mean, var = np.zeros(4), np.ones(4)
    assert batch_norm(x, mean, var, weight, bias, out=out) is out
    assert_close(out, reference_normalize(x, mean, var, weight, bias, 1e-5, 1), dtype)
    y, _, _ = batch_norm_train(x, weight, bias, out=out)
    assert y is out
    ref_mean, ref_var = reference_stats(x, 1)
    assert_close(out, reference_normalize(x, ref_mean, ref_var, weight, bias, 1e-5, 1), dtype)
    if not contiguous:
        np.testing.assert_array_equal(holder[..., 1::2], 7.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1])
def test_outputs_of_32_mib_or_more_are_streamed_correctly(offset, dtype):
    """Outputs this large (y of both forwards, dx of the backward) are written with non-temporal stores
    from an L1 piece: every value must land, also when `out` starts off a 16-byte boundary (offset 1) and
    planes are not a multiple of 4 long."""
    shape = (6, 37, 157, 257) if dtype == np.float32 else (6, 19, 157, 257)
    assert np.prod(shape) * np.dtype(dtype).itemsize >= 32 << 20
    x, weight, bias = make_inputs(shape, 1, dtype, seed=31)
    holder = np.full(np.prod(shape) + 1, 7.0, dtype=dtype)
    out = holder[offset:offset + np.prod(shape)].reshape(shape)
    running_mean, running_var = np.full(shape[1], 0.25), np.full(shape[1], 2.0)
    assert batch_norm(x, running_mean, running_var, weight, bias, out=out) is out
    assert_close(out, reference_normalize(x, running_mean, running_var, weight, bias, 1e-5, 1), dtype)
    y, mean, invstd = batch_norm_train(x, weight, bias, out=out)
    ref_mean, ref_var = reference_stats(x, 1)
    assert_close(mean, ref_mean, dtype)
    assert_close(y, reference_normalize(x, ref_mean, ref_var, weight, bias, 1e-5, 1), dtype)
    assert holder[offset - 1 if offset else -1] == 7.0
    dy = np.random.default_rng(32).standard_normal(shape).astype(dtype)
    dx, dweight, dbias = batch_norm_backward(dy, x, mean, invstd, weight)
    ref_dx, ref_dweight, ref_dbias = reference_backward(dy, x, mean, invstd, weight, 1)
    assert_close(dx, ref_dx, dtype, scale=4.0)
    assert_close(dweight, ref_dweight, dtype)
    assert_close(dbias, ref_dbias, dtype)


# ---------------------------------------------------------------------------------------------------
# Bad input


def _x():
    return np.random.default_rng(23).standard_normal((2, 3, 4)).astype(np.float32)


def test_int_x_is_a_type_error_naming_x():
    with pytest.raises(TypeError, match="x must be a float"):
        batch_norm(np.ones((2, 3, 4), np.int64), np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="x must be a float"):
        batch_norm_train(np.ones((2, 3, 4), np.int32))
    with pytest.raises(TypeError, match="dy must be a float"):
        batch_norm_backward(np.ones((2, 3, 4), np.int32), _x(), np.zeros(3), np.ones(3))


def test_weight_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        batch_norm(_x(), np.zeros(3), np.ones(3), weight=np.ones(4))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        batch_norm_train(_x(), bias=np.ones(3), channel_axis=-1)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        batch_norm_backward(_x(), _x(), np.zeros(3), np.ones(3), weight=np.ones(2))


def test_statistics_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        batch_norm(_x(), np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        batch_norm(_x(), np.zeros(3), np.ones((3, 1)))
    with pytest.raises(TypeError, match="running_var is required"):
        batch_norm(_x(), np.zeros(3), None)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        batch_norm_train(_x(), running_mean=np.zeros(2))
    with pytest.raises(ValueError, match=r"invstd must have shape \(3,\)"):
        batch_norm_backward(_x(), _x(), np.zeros(3), np.ones(5))
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 4\)"):
        batch_norm_backward(np.ones((2, 3, 5), np.float32), _x(), np.zeros(3), np.ones(3))


def test_running_statistics_must_be_writable_float_arrays():
    read_only = np.zeros(3)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean must be writable"):
        batch_norm_train(_x(), running_mean=read_only)
    with pytest.raises(TypeError, match="running_var must be a numpy.ndarray"):
        batch_norm_train(_x(), running_var=[1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="running_var must be a float array"):
        batch_norm_train(_x(), running_var=np.ones(3, np.int64))
    shared = np.zeros(3)
    with pytest.raises(ValueError, match="running_mean and running_var must not overlap"):
        batch_norm_train(_x(), running_mean=shared, running_var=shared)


def test_bad_out():
    x = _x()
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3, 4\)"):
        batch_norm(x, np.zeros(3), np.ones(3), out=np.empty((2, 3, 5), np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        batch_norm_train(x, out=np.empty((2, 3, 4), np.float64))
    with pytest.raises(ValueError, match="out must not overlap x"):
        batch_norm(x, np.zeros(3), np.ones(3), out=x)
    with pytest.raises(ValueError, match="out must not overlap x"):
        batch_norm_train(x, out=x[::-1])
    read_only = np.empty_like(x)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        batch_norm_train(x, out=read_only)


def test_empty_x_and_too_few_dims():
    with pytest.raises(ValueError, match="x must not be empty"):
        batch_norm(np.empty((0, 3, 4), np.float32), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="x must not be empty"):
        batch_norm_train(np.empty((2, 0), np.float32))
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        batch_norm_train(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        batch_norm(np.ones(5, np.float32), np.zeros(5), np.ones(5))


@pytest.mark.parametrize("shape,axis", [((1, 3), 1), ((1, 3, 1, 1), 1), ((1, 1, 1, 4), -1)])
def test_one_value_per_channel_in_training(shape, axis):
    with pytest.raises(ValueError, match="expected more than 1 value per channel when training, got input "
                                         r"of shape \(1, "):
        batch_norm_train(np.ones(shape, np.float32), channel_axis=axis)


@pytest.mark.parametrize("axis", [2, 0, -2, 1.0, True, "1"])
def test_channel_axis_must_be_1_or_minus_1(axis):
    with pytest.raises(ValueError, match="channel_axis must be 1"):
        batch_norm_train(_x(), channel_axis=axis)
    with pytest.raises(ValueError, match="channel_axis must be 1"):
        batch_norm(_x(), np.zeros(3), np.ones(3), channel_axis=axis)
    with pytest.raises(ValueError, match="channel_axis must be 1"):
        batch_norm_backward(_x(), _x(), np.zeros(3), np.ones(3), channel_axis=axis)


def test_bad_eps_momentum_and_threads():
    with pytest.raises(ValueError, match="eps must be"):
        batch_norm_train(_x(), eps=-1.0)
    with pytest.raises(ValueError, match=r"momentum must be a real number in \[0, 1\]"):
        batch_norm_train(_x(), momentum=float("nan"))
    with pytest.raises(ValueError, match="num_threads must be a positive int"):
        batch_norm_train(_x(), num_threads=0)
