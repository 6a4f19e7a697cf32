"""What the normalization kernel tests share: float64 NumPy references, data, tolerances and checks.

Group and instance normalization (instance normalization is group normalization with one channel per
group) share a reference, their inputs and a tolerance model; layer and RMS normalization, which both
normalize the trailing axes from `axis` on, share their (shape, axis) cases, data and tolerances.  The
finite-difference, thread-count and onnxruntime checks serve all four.
"""
import numpy as np
import pytest
from onnx import TensorProto

from tests.onnx_cases import run_ort, single_node_model

DTYPES = [np.float64, np.float32, np.float16]


def _numeric_gradient(f, array, h=1e-6):
    """Central differences of the scalar f(array) with respect to each element of array."""
    grad = np.zeros_like(array)
    for i in np.ndindex(array.shape):
        plus, minus = array.copy(), array.copy()
        plus[i] += h
        minus[i] -= h
        grad[i] = (f(plus) - f(minus)) / (2 * h)
    return grad


def assert_gradients_match_finite_differences(forward, dy, inputs, *gradients):
    """Each tuple in gradients (one entry per array in inputs) against central differences of the loss
    sum(forward(*inputs)[0] * dy), forward being a float64 reference."""

    def loss_along(k):
        return lambda v: float(np.sum(forward(*inputs[:k], v, *inputs[k + 1:])[0] * dy))

    expected = [_numeric_gradient(loss_along(k), a) for k, a in enumerate(inputs)]
    for grads in gradients:
        assert len(grads) == len(inputs)
        for actual, wanted in zip(grads, expected):
            np.testing.assert_allclose(actual, wanted, atol=1e-7)


def run_node_in_ort(op_type, inputs, opset, attrs, outputs=("Y",)):
    """The float32 outputs of one ONNX node run in onnxruntime; inputs are (name, array) graph inputs."""
    model = single_node_model(op_type, inputs, [(name, TensorProto.FLOAT) for name in outputs], opset, attrs)
    return list(run_ort(model, dict(inputs)).values())


def assert_bit_identical_across_threads(run, thread_counts):
    """run(num_threads) returns a tuple of arrays: every thread count must give the same bits."""
    first = run(thread_counts[0])
    for threads in thread_counts[1:]:
        results = run(threads)
        assert len(results) == len(first)
        for a, b in zip(first, results):
            assert np.array_equal(a, b), "%d threads differ from %d" % (threads, thread_counts[0])


# ---------------------------------------------------------------------------------------------------
# Group and instance normalization: x is (N, C, *spatial)

# Absolute tolerance per unit of the result's magnitude (max(1, |expected|)).
TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 1.5e-2}


def assert_close(actual, expected, dtype, scale=1.0):
    """Every error within dtype's TOLERANCE (times scale) per unit of max(1, |expected|)."""
    tol = TOLERANCE[np.dtype(dtype)] * scale
    actual = np.asarray(actual, dtype=np.float64)
    bound = tol * np.maximum(1.0, np.abs(expected))
    err = np.abs(actual - expected)
    assert np.all(err <= bound), "max error %g (tolerance %g)" % (err.max(), tol)


def assert_forward_matches(actual, expected, dtype):
    """(y, mean, invstd) against the reference's: y in x's dtype, the statistics in the compute dtype."""
    y, mean, invstd = actual
    expected_y, expected_mean, expected_invstd = expected
    stats_dtype = np.float64 if dtype == np.float64 else np.float32
    assert y.dtype == dtype and y.shape == expected_y.shape
    assert mean.dtype == stats_dtype and mean.shape == expected_mean.shape
    assert invstd.dtype == stats_dtype and invstd.shape == expected_invstd.shape
    assert_close(y, expected_y, dtype)
    assert_close(mean, expected_mean, stats_dtype)
    assert_close(invstd, expected_invstd, stats_dtype)


def assert_backward_matches(actual, expected, dtype):
    """(dx, dweight, dbias) against the reference's, all in x's dtype."""
    dx, dweight, dbias = actual
    expected_dx, expected_dweight, expected_dbias = expected
    assert dx.dtype == dtype and dx.shape == expected_dx.shape
    assert dweight.dtype == dtype and dweight.shape == expected_dweight.shape
    assert dbias.dtype == dtype and dbias.shape == expected_dbias.shape
    # Sums over many values carry the rounding of each term; scale the tolerance by their count.
    count = dx.size / dweight.size
    assert_close(dx, expected_dx, dtype, scale=4.0)
    assert_close(dweight, expected_dweight, dtype, scale=np.sqrt(count))
    assert_close(dbias, expected_dbias, dtype, scale=np.sqrt(count))


def make_inputs(shape, dtype, seed, affine=True):
    """(x, weight, bias) for x of the given shape; weight and bias None unless affine."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3.0 - 1.0).astype(dtype)
    c = shape[1]
    weight = rng.uniform(-1.5, 1.5, c).astype(dtype) if affine else None
    bias = rng.standard_normal(c).astype(dtype) if affine else None
    return x, weight, bias


def _channel_shape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def reference_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """(y, mean, invstd) in float64; mean and invstd are (N, num_groups)."""
    x = np.asarray(x, dtype=np.float64)
    blocks = x.reshape(x.shape[0], num_groups, -1)
    mean = blocks.mean(axis=2)
    invstd = 1.0 / np.sqrt(((blocks - mean[:, :, None]) ** 2).mean(axis=2) + eps)
    y = ((blocks - mean[:, :, None]) * invstd[:, :, None]).reshape(x.shape)
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(_channel_shape(x))
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(_channel_shape(x))
    return y, mean, invstd


def reference_group_norm_backward(dy, x, num_groups, weight=None, eps=1e-5):
    """Analytic (dx, dweight, dbias) in float64, with the statistics taken from x."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    _, mean, invstd = reference_group_norm(x, num_groups, eps=eps)
    n = x.shape[0]
    xhat = ((x.reshape(n, num_groups, -1) - mean[:, :, None]) * invstd[:, :, None]).reshape(x.shape)
    sum_axes = (0,) + tuple(range(2, x.ndim))
    dbias = dy.sum(axis=sum_axes)
    dweight = (dy * xhat).sum(axis=sum_axes)
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    g = (dy * w.reshape(_channel_shape(x))).reshape(n, num_groups, -1)
    xhat_g = xhat.reshape(n, num_groups, -1)
    dx = invstd[:, :, None] * (
        g - g.mean(axis=2, keepdims=True) - xhat_g * (g * xhat_g).mean(axis=2, keepdims=True)
    )
    return dx.reshape(x.shape), dweight, dbias


def reference_instance_norm(x, weight=None, bias=None, eps=1e-5):
    """(y, mean, invstd) in float64; mean and invstd are (N, C)."""
    return reference_group_norm(x, np.shape(x)[1], weight, bias, eps)


def reference_instance_norm_backward(dy, x, weight=None, eps=1e-5):
    """Analytic (dx, dweight, dbias) in float64, with the statistics taken from x."""
    return reference_group_norm_backward(dy, x, np.shape(x)[1], weight, eps)


# ---------------------------------------------------------------------------------------------------
# Layer and RMS normalization: the axes from `axis` on are normalized

# (shape, axis) for every valid axis, negative ones included: 1-D to 4-D, K = 1, K odd, K not a multiple
# of 8, M = 1.
_ROW_SHAPES = [(7,), (1, 9), (6, 1), (3, 17), (2, 3, 5), (4, 1, 3), (2, 3, 4, 5), (1, 2, 3, 13)]
ROW_CASES = [(shape, axis) for shape in _ROW_SHAPES for axis in range(-len(shape), len(shape))]
# Rows wider than the kernels' segment threshold (65536 values) take their segmented path.
ROW_CASES += [((3, 70001), -1), ((2, 2, 40000), 1)]
# (atol, rtol) of y / dx against the float64 reference, by input dtype.
ROW_TOLERANCE = {np.float64: (1e-10, 1e-10), np.float32: (2e-5, 2e-5), np.float16: (4e-3, 4e-3)}


def assert_rows_close(actual, expected, dtype, scale=1.0):
    """np.testing.assert_allclose with dtype's ROW_TOLERANCE, the absolute part times scale."""
    atol, rtol = ROW_TOLERANCE[dtype]
    np.testing.assert_allclose(actual.astype(np.float64), expected, atol=atol * scale, rtol=rtol)


def data(shape, dtype, seed=0, loc=3.0, scale=2.0):
    """Seeded normal values of mean loc and standard deviation scale."""
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def params(shape, dtype, seed=1):
    """(weight, bias) of the given shape: weights near 1, biases near 0."""
    rng = np.random.default_rng(seed)
    return (1 + 0.5 * rng.standard_normal(shape)).astype(dtype), rng.standard_normal(shape).astype(dtype)


# Strided, reversed and transposed views of a 2-D array, none of them C-contiguous.
non_contiguous_2d_views = pytest.mark.parametrize(
    "view",
    [lambda a: a[:, ::2], lambda a: a[::-1], lambda a: a[:, ::-3], lambda a: np.swapaxes(a, 0, 1)],
    ids=["strided", "reversed", "negative-stride", "transposed"],
)


def assert_matches_backend_outputs(outputs, expected):
    """The outputs of an ONNX backend node case that it lists (it may list fewer than we return)."""
    assert len(expected) <= len(outputs)
    for actual, wanted in zip(outputs, expected):
        assert actual.shape == wanted.shape
        np.testing.assert_allclose(actual, wanted, atol=1e-5, rtol=1e-5)
