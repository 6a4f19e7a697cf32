"""layer_norm and layer_norm_backward against a float64 NumPy reference, onnxruntime and ONNX's own cases."""
import numpy as np
import pytest

from foldnorm.kernels.layer_normalization import layer_norm, layer_norm_backward
from tests.kernels.kernel_refs import (
    DTYPES,
    ROW_CASES,
    assert_bit_identical_across_threads,
    assert_gradients_match_finite_differences,
    assert_matches_backend_outputs,
    assert_rows_close,
    data,
    non_contiguous_2d_views,
    params,
    run_node_in_ort,
)
from tests.onnx_cases import backend_node_cases, node_attributes

def ref_layer_norm(x, weight, bias, axis, eps=1e-5):
    """y, mean, invstd in float64, statistics shaped as ONNX's Mean output."""
    x = x.astype(np.float64)
    axes = tuple(range(axis % x.ndim, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    y = (x - mean) * invstd
    if weight is not None:
        y = y * weight.astype(np.float64)
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y, mean, invstd


def ref_layer_norm_backward(dy, x, weight, axis, eps=1e-5):
    """Analytic dx, dweight, dbias in float64, with the statistics recomputed from x."""
    x = x.astype(np.float64)
    dy = dy.astype(np.float64)
    axes = tuple(range(axis % x.ndim, x.ndim))
    lead = tuple(range(axis % x.ndim))
    _, mean, invstd = ref_layer_norm(x, None, None, axis, eps)
    xhat = (x - mean) * invstd
    g = dy if weight is None else dy * weight.astype(np.float64)
    dx = invstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return dx, (dy * xhat).sum(axis=lead), dy.sum(axis=lead)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", ROW_CASES)
def test_forward_matches_reference(shape, axis, dtype):
    x = data(shape, dtype)
    weight, bias = params(x.shape[axis:], dtype)
    y, mean, invstd = layer_norm(x, weight, bias, axis=axis)
    y_ref, mean_ref, invstd_ref = ref_layer_norm(x, weight, bias, axis)
    compute = np.float64 if dtype == np.float64 else np.float32
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == compute and mean.shape == mean_ref.shape
    assert invstd.dtype == compute and invstd.shape == invstd_ref.shape
    assert_rows_close(y, y_ref, dtype)
    stat_tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(mean, mean_ref, rtol=stat_tol, atol=stat_tol)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=stat_tol)


@pytest.mark.parametrize("with_weight,with_bias", [(False, False), (True, False), (False, True)])
def test_forward_optional_weight_and_bias(with_weight, with_bias):
    x = data((5, 6, 7), np.float32)
    weight, bias = params((6, 7), np.float32)
    weight = weight if with_weight else None
    bias = bias if with_bias else None
    y, _, _ = layer_norm(x, weight, bias, axis=1, eps=1e-3)
    assert_rows_close(y, ref_layer_norm(x, weight, bias, 1, eps=1e-3)[0], np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", ROW_CASES)
def test_backward_matches_analytic_reference(shape, axis, dtype):
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=2, loc=0.5, scale=1.0)
    weight, bias = params(x.shape[axis:], dtype)
    _, mean, invstd = layer_norm(x, weight, bias, axis=axis)
    dx, dweight, dbias = layer_norm_backward(dy, x, mean, invstd, weight, axis=axis)
    dx_ref, dweight_ref, dbias_ref = ref_layer_norm_backward(dy, x, weight, axis)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert dweight.dtype == dtype and dweight.shape == x.shape[axis:] == dbias.shape
    assert_rows_close(dx, dx_ref, dtype)
    rows = x.size // dweight.size
    assert_rows_close(dweight, dweight_ref, dtype, scale=rows)
    assert_rows_close(dbias, dbias_ref, dtype, scale=rows)


def test_backward_without_weight():
    x = data((9, 11), np.float64)
    dy = data((9, 11), np.float64, seed=3)
    _, mean, invstd = layer_norm(x)
    dx, dweight, dbias = layer_norm_backward(dy, x, mean, invstd)
    for actual, expected in zip((dx, dweight, dbias), ref_layer_norm_backward(dy, x, None, -1)):
        assert_rows_close(actual, expected, np.float64)


@pytest.mark.parametrize("shape,axis", [((3, 4), -1), ((2, 3, 4), 1), ((5,), 0), ((2, 1, 3), 2)])
def test_backward_against_finite_differences(shape, axis):
    """The loss sum(y * dy) differentiated numerically through the reference forward pass."""
    x = data(shape, np.float64, seed=4)
    dy = data(shape, np.float64, seed=5, loc=0.0, scale=1.0)
    weight, bias = params(x.shape[axis:], np.float64, seed=6)
    _, mean, invstd = layer_norm(x, weight, bias, axis=axis)
    assert_gradients_match_finite_differences(
        lambda x_, weight_, bias_: ref_layer_norm(x_, weight_, bias_, axis),
        dy,
        (x, weight, bias),
        ref_layer_norm_backward(dy, x, weight, axis),
        layer_norm_backward(dy, x, mean, invstd, weight, axis=axis),
    )


def test_large_mean_small_spread_float32():
    """Rows with mean 1e4 and std 1e-2: float32 E[x^2]-E[x]^2 would be useless here."""
    x = data((64, 1000), np.float32, loc=1e4, scale=1e-2)
    y, mean, invstd = layer_norm(x)
    y_ref, mean_ref, invstd_ref = ref_layer_norm(x, None, None, -1)
    np.testing.assert_allclose(y, y_ref, atol=5e-5)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-5)
    dy = data(x.shape, np.float32, seed=7, loc=0.0, scale=1.0)
    dx, dweight, _ = layer_norm_backward(dy, x, mean, invstd)
    dx_ref, dweight_ref, _ = ref_layer_norm_backward(dy, x, None, -1)
    np.testing.assert_allclose(dx, dx_ref, atol=2e-3 * np.abs(dx_ref).max())
    np.testing.assert_allclose(dweight, dweight_ref, atol=1e-3 * np.abs(dweight_ref).max())


def test_rows_that_start_far_from_their_mean():
    """Rows whose first values are outliers, or that are ramps, or that mix scales block by block."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 5000)).astype(np.float32)
    x[0, :8] = 1e4
    x[1] = np.linspace(-1e3, 1e3, 5000)
    x[2, :2048] *= 1e-3
    x[3, 2048:] += 1e3
    y, mean, invstd = layer_norm(x)
    y_ref, mean_ref, invstd_ref = ref_layer_norm(x, None, None, -1)
    assert_rows_close(y, y_ref, np.float32)
    np.testing.assert_allclose(mean, mean_ref, atol=1e-6 / invstd_ref.min())
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-6)


@pytest.mark.parametrize("shape,dtype", [((4200, 2003), np.float32), ((2200, 2003), np.float64),
                                         ((26, 330001), np.float32)])
def test_outputs_of_32_mib_or_more_are_streamed_correctly(shape, dtype):
    """y this large is written with non-temporal stores from an L1 piece: rows of an odd length start off
    the 16-byte boundary the stores need, and the last shape's rows are cut into segments."""
    assert np.prod(shape) * np.dtype(dtype).itemsize >= 32 << 20
    x = data(shape, dtype)
    weight, bias = params(shape[1:], dtype)
    y, mean, invstd = layer_norm(x, weight, bias)
    y_ref, mean_ref, _ = ref_layer_norm(x, weight, bias, -1)
    assert_rows_close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6)


def test_constant_rows():
    x = np.full((4, 33), 2.5, np.float32)
    weight, bias = params((33,), np.float32)
    y, mean, invstd = layer_norm(x, weight, bias)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, x.shape))
    np.testing.assert_array_equal(mean, 2.5)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(1e-5), rtol=1e-6)


@pytest.mark.parametrize("scale,eps", [(1e30, 1e-5), (1e-22, 0.0), (1e19, 1e-5)])
def test_extreme_magnitudes_float32(scale, eps):
    """Values near 1e30 (squares beyond float32's range) and near 1e-22 (squares below it)."""
    x = (scale * data((8, 300), np.float64, seed=8, loc=1.0, scale=0.3)).astype(np.float32)
    weight, bias = params((300,), np.float32)
    y, _, invstd = layer_norm(x, weight, bias, eps=eps)
    y_ref, _, invstd_ref = ref_layer_norm(x, weight, bias, -1, eps=eps)
    assert np.isfinite(y).all()
    assert_rows_close(y, y_ref, np.float32)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-5)


@pytest.mark.parametrize("scale,eps", [(1e-22, 0.0), (1e20, 1e-5)])
def test_backward_of_extreme_magnitudes_float32(scale, eps):
    """dy and x near 1e-22 (products below float32's range) and near 1e20 (products beyond it)."""
    x = (scale * data((6, 300), np.float64, seed=8, loc=1.0, scale=0.3)).astype(np.float32)
    dy = (scale * data((6, 300), np.float64, seed=9, loc=0.0, scale=1.0)).astype(np.float32)
    weight, _ = params((300,), np.float32)
    _, mean, invstd = layer_norm(x, weight, eps=eps)
    dx, dweight, dbias = layer_norm_backward(dy, x, mean, invstd, weight)
    ref_dx, ref_dweight, ref_dbias = ref_layer_norm_backward(dy, x, weight, -1, eps=eps)
    for actual, expected in ((dx, ref_dx), (dweight, ref_dweight), (dbias, ref_dbias)):
        assert np.isfinite(actual).all()
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_backward_of_rows_of_mixed_magnitudes_float32():
    """Rows near 1e-22 (scaled into float32's range) beside ordinary rows: the backward pass writes rows of
    this width in batches, here batches holding both kinds, and a last batch that is not whole."""
    x = data((11, 2100), np.float64, seed=8, loc=1.0, scale=0.3)
    x[[1, 6]] *= 1e-22
    x = x.astype(np.float32)
    dy = data((11, 2100), np.float32, seed=9, loc=0.0, scale=1.0)
    weight, _ = params((2100,), np.float32)
    _, mean, invstd = layer_norm(x, weight, eps=0.0)
    dx, dweight, dbias = layer_norm_backward(dy, x, mean, invstd, weight)
    ref_dx, ref_dweight, ref_dbias = ref_layer_norm_backward(dy, x, weight, -1, eps=0.0)
    for row in range(x.shape[0]):
        np.testing.assert_allclose(dx[row], ref_dx[row], rtol=1e-4, atol=1e-5 * np.abs(ref_dx[row]).max())
    for actual, expected in ((dweight, ref_dweight), (dbias, ref_dbias)):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_propagate_to_their_rows_only(bad, dtype):
    x = data((5, 70), dtype)
    x[2, 13] = bad
    y, mean, invstd = layer_norm(x)
    assert np.isnan(y[2]).all()
    y_ref = ref_layer_norm(np.delete(x, 2, axis=0), None, None, -1)[0]
    assert_rows_close(np.delete(y, 2, axis=0), y_ref, dtype)
    dx, dweight, dbias = layer_norm_backward(np.ones_like(x), x, mean, invstd)
    assert np.isnan(dx[2]).all() and np.isfinite(np.delete(dx, 2, axis=0)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((2000, 531), -1), ((37, 11, 999), 1), ((5, 70001), 1)])
def test_one_and_two_threads_bit_identical(shape, axis, dtype):
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=9, loc=0.0, scale=1.0)
    weight, bias = params(x.shape[axis:], dtype)
    assert_bit_identical_across_threads(
        lambda t: layer_norm(x, weight, bias, axis=axis, num_threads=t), (1, 2)
    )
    _, mean, invstd = layer_norm(x, weight, bias, axis=axis)
    assert_bit_identical_across_threads(
        lambda t: layer_norm_backward(dy, x, mean, invstd, weight, axis=axis, num_threads=t), (1, 2, 3)
    )


@non_contiguous_2d_views
def test_non_contiguous_inputs(view):
    base = data((12, 30), np.float32)
    x = view(base)
    dy = view(data((12, 30), np.float32, seed=10))
    weight, bias = params(x.shape[-1:], np.float32)
    weight_view = np.repeat(weight, 2)[::2]
    y, mean, invstd = layer_norm(x, weight_view, bias)
    assert_rows_close(y, ref_layer_norm(x, weight, bias, -1)[0], np.float32)
    dx, dweight, dbias = layer_norm_backward(dy, x, np.repeat(mean, 2)[::2], invstd, weight_view)
    for actual, expected in zip((dx, dweight, dbias), ref_layer_norm_backward(dy, x, weight, -1)):
        assert_rows_close(actual, expected, np.float32, scale=x.shape[0])


def test_bad_input():
    x = data((4, 5), np.float32)
    _, mean, invstd = layer_norm(x)
    with pytest.raises(TypeError, match="x must be a float16, float32 or float64 array"):
        layer_norm(np.ones((4, 5), np.int64))
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        layer_norm(x, np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"bias must have shape \(4, 5\)"):
        layer_norm(x, None, np.ones(5, np.float32), axis=0)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        layer_norm(x, axis=2)
    with pytest.raises(ValueError, match="axis=-3 is out of range"):
        layer_norm_backward(x, x, mean, invstd, axis=-3)
    with pytest.raises(ValueError, match="x must not be empty"):
        layer_norm(np.ones((0, 5), np.float32))
    with pytest.raises(ValueError, match="eps must be"):
        layer_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 5\)"):
        layer_norm_backward(x[:3], x, mean, invstd)
    with pytest.raises(ValueError, match="mean must hold one value per normalized row"):
        layer_norm_backward(x, x, mean[:3], invstd)
    with pytest.raises(ValueError, match="invstd must hold one value per normalized row"):
        layer_norm_backward(x, x, mean, np.ones(5, np.float32))
    with pytest.raises(TypeError, match="mean must be a float array"):
        layer_norm_backward(x, x, np.ones(4, np.int32), invstd)
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        layer_norm_backward(x, x, mean, invstd, np.ones(6, np.float32))
    with pytest.raises(ValueError, match="num_threads must be a positive int"):
        layer_norm(x, num_threads=0)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape,axis", [((4, 6, 10), -1), ((4, 6, 10), 1), ((3, 5), 0), ((2, 3, 4, 5), -2)])
def test_against_onnxruntime(shape, axis, with_bias):
    x = data(shape, np.float32)
    weight, bias = params(x.shape[axis:], np.float32)
    inputs = [("X", x), ("W", weight)] + ([("B", bias)] if with_bias else [])
    attrs = {"axis": axis, "epsilon": 1e-4}
    outputs = ("Y", "Mean", "InvStdDev")
    y_ort, mean_ort, invstd_ort = run_node_in_ort("LayerNormalization", inputs, 17, attrs, outputs)
    y, mean, invstd = layer_norm(x, weight, bias if with_bias else None, axis=axis, eps=1e-4)
    np.testing.assert_allclose(y, y_ort, atol=1e-5, rtol=1e-5)
    assert mean.shape == mean_ort.shape and invstd.shape == invstd_ort.shape
    np.testing.assert_allclose(mean, mean_ort, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(invstd, invstd_ort, rtol=1e-5)


BACKEND_CASES = backend_node_cases("test_layer_normalization")


def test_backend_cases_found():
    assert len(BACKEND_CASES) >= 19


@pytest.mark.parametrize("name,node,inputs,expected", BACKEND_CASES, ids=[c[0] for c in BACKEND_CASES])
def test_onnx_backend_node_case(name, node, inputs, expected):
    attrs = node_attributes(node)
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    outputs = layer_norm(x, weight, bias, axis=attrs.get("axis", -1), eps=attrs.get("epsilon", 1e-5))
    assert_matches_backend_outputs(outputs, expected)
