"""rms_norm and rms_norm_backward against a float64 NumPy reference, onnxruntime and ONNX's own cases."""
import functools

import numpy as np
import pytest

from foldnorm.kernels.layer_normalization import rms_norm, rms_norm_backward
from tests.kernels import kernel_refs
from tests.kernels.kernel_refs import (
    DTYPES,
    ROW_CASES,
    assert_bit_identical_across_threads,
    assert_gradients_match_finite_differences,
    assert_matches_backend_outputs,
    assert_rows_close,
    non_contiguous_2d_views,
    params,
    run_node_in_ort,
)
from tests.onnx_cases import backend_node_cases, node_attributes

# RMS normalization does not subtract the mean: rows centred near 0.5 (not 3) hold values of both signs.
data = functools.partial(kernel_refs.data, loc=0.5)


def ref_rms_norm(x, weight, axis, eps=1e-5):
    """y and invrms in float64, invrms shaped as x.shape[:axis] + (1, ...)."""
    x = x.astype(np.float64)
    axes = tuple(range(axis % x.ndim, x.ndim))
    invrms = 1.0 / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    y = x * invrms
    if weight is not None:
        y = y * weight.astype(np.float64)
    return y, invrms


def ref_rms_norm_backward(dy, x, weight, axis, eps=1e-5):
    """Analytic dx and dweight in float64, with invrms recomputed from x."""
    x = x.astype(np.float64)
    dy = dy.astype(np.float64)
    axes = tuple(range(axis % x.ndim, x.ndim))
    lead = tuple(range(axis % x.ndim))
    _, invrms = ref_rms_norm(x, None, axis, eps)
    g = dy if weight is None else dy * weight.astype(np.float64)
    dx = invrms * g - x * invrms**3 * (g * x).mean(axis=axes, keepdims=True)
    return dx, (dy * x * invrms).sum(axis=lead)


@pytest.mark.parametrize("shape,dtype", [((4200, 2003), np.float32), ((2200, 2003), np.float64),
                                         ((26, 330001), np.float32)])
def test_outputs_of_32_mib_or_more_are_streamed_correctly(shape, dtype):
    """y this large is written with non-temporal stores from an L1 piece (odd rows start off the 16-byte
    boundary; the last shape's rows are cut into segments)."""
    assert np.prod(shape) * np.dtype(dtype).itemsize >= 32 << 20
    x = data(shape, dtype)
    weight, _ = params(shape[1:], dtype)
    y, invrms = rms_norm(x, weight)
    y_ref, invrms_ref = ref_rms_norm(x, weight, -1)
    assert_rows_close(y, y_ref, dtype)
    np.testing.assert_allclose(invrms, invrms_ref, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", ROW_CASES)
def test_forward_matches_reference(shape, axis, dtype):
    x = data(shape, dtype)
    weight, _ = params(x.shape[axis:], dtype)
    y, invrms = rms_norm(x, weight, axis=axis)
    y_ref, invrms_ref = ref_rms_norm(x, weight, axis)
    compute = np.float64 if dtype == np.float64 else np.float32
    assert y.dtype == dtype and y.shape == x.shape
    assert invrms.dtype == compute and invrms.shape == invrms_ref.shape
    assert_rows_close(y, y_ref, dtype)
    np.testing.assert_allclose(invrms, invrms_ref, rtol=1e-12 if dtype == np.float64 else 1e-6)


def test_forward_without_weight():
    x = data((5, 6, 7), np.float32)
    y, _ = rms_norm(x, axis=-2, eps=1e-3)
    assert_rows_close(y, ref_rms_norm(x, None, -2, eps=1e-3)[0], np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", ROW_CASES)
def test_backward_matches_analytic_reference(shape, axis, dtype):
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=2, loc=0.5, scale=1.0)
    weight, _ = params(x.shape[axis:], dtype)
    _, invrms = rms_norm(x, weight, axis=axis)
    dx, dweight = rms_norm_backward(dy, x, invrms, weight, axis=axis)
    dx_ref, dweight_ref = ref_rms_norm_backward(dy, x, weight, axis)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert dweight.dtype == dtype and dweight.shape == x.shape[axis:]
    assert_rows_close(dx, dx_ref, dtype)
    assert_rows_close(dweight, dweight_ref, dtype, scale=x.size // dweight.size)


def test_backward_without_weight():
    x = data((9, 11), np.float64)
    dy = data((9, 11), np.float64, seed=3)
    _, invrms = rms_norm(x)
    dx, dweight = rms_norm_backward(dy, x, invrms)
    for actual, expected in zip((dx, dweight), ref_rms_norm_backward(dy, x, None, -1)):
        assert_rows_close(actual, expected, np.float64)


@pytest.mark.parametrize("shape,axis", [((3, 4), -1), ((2, 3, 4), 1), ((5,), 0), ((2, 1, 3), 2)])
def test_backward_against_finite_differences(shape, axis):
    """The loss sum(y * dy) differentiated numerically through the reference forward pass."""
    x = data(shape, np.float64, seed=4)
    dy = data(shape, np.float64, seed=5, loc=0.0, scale=1.0)
    weight, _ = params(x.shape[axis:], np.float64, seed=6)
    _, invrms = rms_norm(x, weight, axis=axis)
    assert_gradients_match_finite_differences(
        lambda x_, weight_: ref_rms_norm(x_, weight_, axis),
        dy,
        (x, weight),
        ref_rms_norm_backward(dy, x, weight, axis),
        rms_norm_backward(dy, x, invrms, weight, axis=axis),
    )


def test_large_mean_small_spread_float32():
    x = data((64, 1000), np.float32, loc=1e4, scale=1e-2)
    y, invrms = rms_norm(x)
    y_ref, invrms_ref = ref_rms_norm(x, None, -1)
    np.testing.assert_allclose(y, y_ref, rtol=2e-7)
    np.testing.assert_allclose(invrms, invrms_ref, rtol=2e-7)


def test_zero_and_constant_rows():
    x = np.zeros((3, 40), np.float32)
    x[1] = -3.0
    y, invrms = rms_norm(x, eps=1e-6)
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_allclose(y[1], -3.0 / np.sqrt(9.0 + 1e-6), rtol=1e-7)
    np.testing.assert_allclose(invrms.ravel(), [1e3, 1 / np.sqrt(9 + 1e-6), 1e3], rtol=1e-6)


@pytest.mark.parametrize("scale,eps", [(1e30, 1e-5), (1e-22, 0.0)])
def test_extreme_magnitudes_float32(scale, eps):
    x = (scale * data((8, 300), np.float64, seed=8)).astype(np.float32)
    weight, _ = params((300,), np.float32)
    y, invrms = rms_norm(x, weight, eps=eps)
    y_ref, invrms_ref = ref_rms_norm(x, weight, -1, eps=eps)
    assert np.isfinite(y).all()
    assert_rows_close(y, y_ref, np.float32)
    np.testing.assert_allclose(invrms, invrms_ref, rtol=1e-6)


@pytest.mark.parametrize("scale,eps", [(1e-22, 0.0), (1e20, 1e-5)])
def test_backward_of_extreme_magnitudes_float32(scale, eps):
    """dy and x near 1e-22 (products below float32's range) and near 1e20 (products beyond it)."""
    x = (scale * data((6, 300), np.float64, seed=8)).astype(np.float32)
    dy = (scale * data((6, 300), np.float64, seed=9)).astype(np.float32)
    weight, _ = params((300,), np.float32)
    _, invrms = rms_norm(x, weight, eps=eps)
    dx, dweight = rms_norm_backward(dy, x, invrms, weight)
    ref_dx, ref_dweight = ref_rms_norm_backward(dy, x, weight, -1, eps=eps)
    for actual, expected in ((dx, ref_dx), (dweight, ref_dweight)):
        assert np.isfinite(actual).all()
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_propagate_to_their_rows_only(bad, dtype):
    x = data((5, 70), dtype)
    x[2, 13] = bad
    y, invrms = rms_norm(x)
    # inf * 1/sqrt(inf) is NaN in NumPy too; 0 * 1/sqrt(inf) is 0.
    with np.errstate(invalid="ignore"):
        y_ref, _ = ref_rms_norm(x, None, -1)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    assert_rows_close(np.delete(y, 2, axis=0), np.delete(y_ref, 2, axis=0), dtype)
    dx, _ = rms_norm_backward(np.ones_like(x), x, invrms)
    assert np.isnan(dx[2, 13]) and np.isfinite(np.delete(dx, 2, axis=0)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((2000, 531), -1), ((37, 11, 999), 1), ((5, 70001), 1)])
def test_one_and_two_threads_bit_identical(shape, axis, dtype):
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=9, loc=0.0, scale=1.0)
    weight, _ = params(x.shape[axis:], dtype)
    assert_bit_identical_across_threads(lambda t: rms_norm(x, weight, axis=axis, num_threads=t), (1, 2))
    _, invrms = rms_norm(x, weight, axis=axis)
    assert_bit_identical_across_threads(
        lambda t: rms_norm_backward(dy, x, invrms, weight, axis=axis, num_threads=t), (1, 2, 3)
    )


@non_contiguous_2d_views
def test_non_contiguous_inputs(view):
    x = view(data((12, 30), np.float32))
    dy = view(data((12, 30), np.float32, seed=10))
    weight, _ = params(x.shape[-1:], np.float32)
    weight_view = np.repeat(weight, 2)[::2]
    y, invrms = rms_norm(x, weight_view)
    assert_rows_close(y, ref_rms_norm(x, weight, -1)[0], np.float32)
    dx, dweight = rms_norm_backward(dy, x, np.repeat(invrms, 2)[::2], weight_view)
    for actual, expected in zip((dx, dweight), ref_rms_norm_backward(dy, x, weight, -1)):
        assert_rows_close(actual, expected, np.float32, scale=x.shape[0])


def test_bad_input():
    x = data((4, 5), np.float32)
    _, invrms = rms_norm(x)
    with pytest.raises(TypeError, match="x must be a float16, float32 or float64 array"):
        rms_norm(np.ones((4, 5), np.int32))
    with pytest.raises(ValueError, match=r"weight must have shape \(4, 5\)"):
        rms_norm(x, np.ones(5, np.float32), axis=-2)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        rms_norm(x, axis=2)
    with pytest.raises(ValueError, match="axis=-3 is out of range"):
        rms_norm_backward(x, x, invrms, axis=-3)
    with pytest.raises(ValueError, match="x must not be empty"):
        rms_norm(np.ones((3, 0), np.float64))
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 5\)"):
        rms_norm_backward(x.T, x, invrms)
    with pytest.raises(ValueError, match="invrms must hold one value per normalized row"):
        rms_norm_backward(x, x, np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="dy must be a float16, float32 or float64 array"):
        rms_norm_backward(np.ones((4, 5), np.int64), x, invrms)
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        rms_norm_backward(x, x, invrms, np.ones((1, 5), np.float32))


def _ort_rms_normalization(x, weight, axis, eps):
    """onnxruntime's RMSNormalization-23, or a skip when the installed onnxruntime cannot run it."""
    inputs = [("X", x), ("W", weight)]
    try:
        (y,) = run_node_in_ort("RMSNormalization", inputs, 23, {"axis": axis, "epsilon": eps})
        return y
    except Exception as error:  # onnxruntime raises its own exception types for an unknown op/opset
        pytest.skip("the installed onnxruntime cannot run RMSNormalization-23: %s" % str(error).splitlines()[0])


@pytest.mark.parametrize("shape,axis", [((4, 6, 10), -1), ((4, 6, 10), 1), ((3, 5), 0), ((2, 3, 4, 5), -2)])
def test_against_onnxruntime(shape, axis):
    x = data(shape, np.float32)
    weight, _ = params(x.shape[axis:], np.float32)
    y_ort = _ort_rms_normalization(x, weight, axis, 1e-4)
    y, _ = rms_norm(x, weight, axis=axis, eps=1e-4)
    np.testing.assert_allclose(y, y_ort, atol=1e-5, rtol=1e-5)


BACKEND_CASES = backend_node_cases("test_rms_normalization")


def test_backend_cases_found():
    assert len(BACKEND_CASES) >= 19


@pytest.mark.parametrize("name,node,inputs,expected", BACKEND_CASES, ids=[c[0] for c in BACKEND_CASES])
def test_onnx_backend_node_case(name, node, inputs, expected):
    attrs = node_attributes(node)
    assert attrs.get("stash_type", 1) == 1, "only float32 statistics are defined here"
    outputs = rms_norm(inputs[0], inputs[1], axis=attrs.get("axis", -1), eps=attrs.get("epsilon", 1e-5))
    assert_matches_backend_outputs(outputs, expected)
