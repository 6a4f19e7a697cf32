"""instance_norm and instance_norm_backward against a float64 NumPy reference, finite differences,
onnxruntime and the ONNX backend node test cases."""
import numpy as np
import pytest

from foldnorm.kernels.group_normalization import instance_norm, instance_norm_backward
from tests.kernels.kernel_refs import (
    DTYPES,
    assert_backward_matches,
    assert_bit_identical_across_threads,
    assert_close,
    assert_forward_matches,
    assert_gradients_match_finite_differences,
    make_inputs,
    reference_instance_norm,
    reference_instance_norm_backward,
    run_node_in_ort,
)
from tests.onnx_cases import backend_node_cases, node_attributes

# 1 to 3 spatial dims, odd sizes, C = 1, N = 1, C not a multiple of 8.  The last ones have fewer than 32
# (n, c) planes of at least two statistics blocks each, so the kernel cuts planes into chunks.
SHAPES = [
    (2, 3, 1),
    (5, 6, 9),
    (3, 13, 7, 5),
    (2, 5, 4, 3, 5),
    (1, 10, 7, 5),
    (7, 1, 5, 3),
    (4, 17, 2, 3),
    (1, 2, 100, 100),
    (3, 1, 4099),
    (2, 3, 2, 2900),
]


def shape_id(shape):
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------------------------------------
# Forward and backward against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_forward_matches_reference(shape, dtype, affine):
    x, weight, bias = make_inputs(shape, dtype, seed=sum(shape), affine=affine)
    actual = instance_norm(x, weight, bias, eps=1e-3)
    assert_forward_matches(actual, reference_instance_norm(x, weight, bias, eps=1e-3), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_backward_matches_reference(shape, dtype, affine):
    x, weight, _ = make_inputs(shape, dtype, seed=2 * sum(shape), affine=affine)
    dy = np.random.default_rng(len(shape)).standard_normal(shape).astype(dtype)
    _, mean, invstd = instance_norm(x, weight, eps=1e-3)
    actual = instance_norm_backward(dy, x, mean, invstd, weight)
    assert_backward_matches(actual, reference_instance_norm_backward(dy, x, weight, eps=1e-3), dtype)


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 2, 2, 3), (3, 1, 5), (2, 2, 2, 2, 2)], ids=shape_id)
def test_gradients_match_finite_differences(shape):
    rng = np.random.default_rng(41)
    x = rng.standard_normal(shape)
    weight = rng.uniform(0.5, 1.5, shape[1])
    bias = rng.standard_normal(shape[1])
    dy = rng.standard_normal(shape)
    _, mean, invstd = instance_norm(x, weight, bias)
    assert_gradients_match_finite_differences(
        reference_instance_norm,
        dy,
        (x, weight, bias),
        reference_instance_norm_backward(dy, x, weight),
        instance_norm_backward(dy, x, mean, invstd, weight),
    )


# ---------------------------------------------------------------------------------------------------
# Adversarial data


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_large_mean_small_spread(dtype):
    rng = np.random.default_rng(43)
    x = (1e4 + 1e-2 * rng.standard_normal((3, 4, 30, 30))).astype(dtype)
    weight = rng.uniform(0.5, 1.5, 4).astype(dtype)
    y, mean, _ = instance_norm(x, weight)
    expected_y, expected_mean, _ = reference_instance_norm(x, weight)
    # float32 x near 1e4 is spaced 1e-3 apart, a tenth of the spread: the normalized values must still
    # be those of the stored x, to a few float32 roundings of y.
    assert_close(y, expected_y, dtype, scale=4.0)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-7 if dtype == np.float32 else 1e-14)
    if dtype == np.float64:
        dy = rng.standard_normal(x.shape)
        _, mean, invstd = instance_norm(x, weight)
        dx, dweight, _ = instance_norm_backward(dy, x, mean, invstd, weight)
        expected = reference_instance_norm_backward(dy, x, weight)
        np.testing.assert_allclose(dx, expected[0], rtol=1e-7, atol=1e-7 * np.abs(expected[0]).max())
        np.testing.assert_allclose(dweight, expected[1], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_constant_plane_gives_bias(dtype):
    x = np.full((2, 3, 5, 3), -2.5, dtype=dtype)
    x[:, 1] = 6.0
    weight = np.array([2.0, 3.0, 4.0], dtype=dtype)
    bias = np.array([0.5, -1.0, 0.25], dtype=dtype)
    y, mean, invstd = instance_norm(x, weight, bias)
    np.testing.assert_array_equal(y, np.broadcast_to(bias.reshape(1, 3, 1, 1), x.shape))
    np.testing.assert_array_equal(mean, [[-2.5, 6.0, -2.5], [-2.5, 6.0, -2.5]])
    dy = np.random.default_rng(47).standard_normal(x.shape).astype(dtype)
    dx, dweight, dbias = instance_norm_backward(dy, x, mean, invstd, weight)
    expected = reference_instance_norm_backward(dy, x, weight)
    assert_close(dx, expected[0], dtype, scale=4.0)
    np.testing.assert_array_equal(dweight, 0.0)


def test_values_near_float32_limit():
    rng = np.random.default_rng(53)
    x = (rng.standard_normal((2, 5, 6, 7)) * 1e30 - 3e29).astype(np.float32)
    y, mean, invstd = instance_norm(x)
    expected_y, expected_mean, expected_invstd = reference_instance_norm(x)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(invstd))
    assert_close(y, expected_y, np.float32)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(invstd, expected_invstd, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_poison_only_their_plane(dtype, bad):
    rng = np.random.default_rng(59)
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    x[0, 2, 1, 3] = bad
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, mean, invstd = instance_norm(x)
    assert np.all(np.isnan(y[0, 2])) and np.isnan(invstd[0, 2])
    clean = np.ones(x.shape, dtype=bool)
    clean[0, 2] = False
    with np.errstate(invalid="ignore"):
        expected_y, _, _ = reference_instance_norm(x)
        expected_dx = reference_instance_norm_backward(dy, x)[0]
    assert_close(y[clean], expected_y[clean], dtype)
    dx, dweight, dbias = instance_norm_backward(dy, x, mean, invstd)
    assert np.all(np.isnan(dx[0, 2])) and np.isnan(dweight[2]) and np.all(np.isfinite(dweight[:2]))
    assert_close(dx[clean], expected_dx[clean], dtype, scale=4.0)
    assert np.all(np.isfinite(dbias))


# ---------------------------------------------------------------------------------------------------
# Threads, layouts


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(6, 16, 17, 15), (1, 2, 100, 100), (3, 3, 5000)], ids=shape_id)
def test_one_and_two_threads_are_bit_identical(shape, dtype):
    x, weight, bias = make_inputs(shape, dtype, seed=61)
    dy = np.random.default_rng(62).standard_normal(shape).astype(dtype)

    def run(threads):
        y, mean, invstd = instance_norm(x, weight, bias, num_threads=threads)
        grads = instance_norm_backward(dy, x, mean, invstd, weight, num_threads=threads)
        return (y, mean, invstd) + grads

    assert_bit_identical_across_threads(run, (1, 2))


def test_noncontiguous_and_negative_stride_inputs():
    rng = np.random.default_rng(67)
    base = rng.standard_normal((3, 5, 8, 12))
    weight = rng.standard_normal(10)[::-2]
    views = [
        base[:, ::-1, ::2, ::-3],
        base.transpose(0, 1, 3, 2),
        np.moveaxis(np.moveaxis(base, 1, -1).copy(), -1, 1),
    ]
    for x in views:
        assert not x.flags.c_contiguous
        y, mean, invstd = instance_norm(x, weight)
        assert_close(y, reference_instance_norm(x, weight)[0], np.float64)
        dy = rng.standard_normal(x.shape)[:, :, ::-1]
        dx, dweight, dbias = instance_norm_backward(dy, x, mean, invstd, weight)
        expected = reference_instance_norm_backward(dy, x, weight)
        for actual, e in zip((dx, dweight, dbias), expected):
            assert_close(actual, e, np.float64, scale=10.0)


# ---------------------------------------------------------------------------------------------------
# Bad input


X = np.zeros((2, 4, 3), dtype=np.float32)
STATS = np.zeros((2, 4), dtype=np.float32)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: instance_norm(X.astype(np.int16)), TypeError, "x"),
        (lambda: instance_norm(X.astype(np.complex64)), TypeError, "x"),
        (lambda: instance_norm(np.zeros((2, 4), np.float32)), ValueError, "x"),
        (lambda: instance_norm(np.zeros((2, 0, 3), np.float32)), ValueError, "x"),
        (lambda: instance_norm(X, np.ones(3)), ValueError, "weight"),
        (lambda: instance_norm(X, None, np.ones(5)), ValueError, "bias"),
        (lambda: instance_norm(X, eps=float("nan")), ValueError, "eps"),
        (lambda: instance_norm(X, num_threads=1.5), TypeError, "num_threads"),
        (lambda: instance_norm_backward(X[:, :2], X, STATS, STATS), ValueError, "dy"),
        (lambda: instance_norm_backward(X, X, STATS[:1], STATS), ValueError, "mean"),
        (lambda: instance_norm_backward(X, X, STATS, STATS[:, :3]), ValueError, "invstd"),
        (lambda: instance_norm_backward(X, X, STATS, None), TypeError, "invstd"),
        (lambda: instance_norm_backward(X, X, STATS, STATS, np.ones(2)), ValueError, "weight"),
        (lambda: instance_norm_backward(X, X[0], STATS, STATS), ValueError, "x"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=r"\b%s\b" % name):
        call()


# ---------------------------------------------------------------------------------------------------
# onnxruntime and the ONNX backend node cases


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 8, 9), (3, 5, 4, 3, 2), (2, 10, 33, 31)], ids=shape_id)
@pytest.mark.parametrize("opset", [6, 22])
def test_matches_onnxruntime_instance_normalization(shape, opset):
    x, weight, bias = make_inputs(shape, np.float32, seed=71)
    inputs = [("input", x), ("scale", weight), ("B", bias)]
    (expected,) = run_node_in_ort("InstanceNormalization", inputs, opset, {"epsilon": 1e-4})
    y, _, _ = instance_norm(x, weight, bias, eps=1e-4)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


INSTANCE_NORM_CASES = backend_node_cases("test_instancenorm")


def test_backend_instancenorm_cases_are_present():
    assert len(INSTANCE_NORM_CASES) >= 2


@pytest.mark.parametrize("case", INSTANCE_NORM_CASES, ids=lambda c: c[0])
def test_backend_instancenorm_node_cases(case):
    name, node, (x, scale, bias), (expected,) = case
    eps = node_attributes(node).get("epsilon", 1e-5)
    y, _, _ = instance_norm(x, scale, bias, eps=eps)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
