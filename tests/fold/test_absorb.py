"""The absorbers, against direct float64 NumPy references of Conv, ConvTranspose, Gemm and MatMul.

Backward folds: affine(layer(x)) must equal folded_layer(x). Forward folds: layer(affine(x)) must equal
folded_layer(x). In float64 to ~1e-12; for float16/float32 weights within the rounding of the folded
weights to their dtype. The references are themselves checked against onnxruntime.
"""
import ml_dtypes
import numpy as np
import pytest

from foldnorm.fold.core import absorb
from foldnorm.fold.core.absorb import (
    affine_as_mul_add,
    fold_forward_into_conv,
    fold_forward_into_conv_transpose,
    fold_forward_into_gemm,
    fold_forward_into_matmul,
    fold_into_conv,
    fold_into_conv_transpose,
    fold_into_gemm,
    fold_into_matmul,
)
from foldnorm.fold.core.affine import ChannelAffine
from tests.onnx_cases import run_ort, single_node_model

SEED = 7321
EPS = {np.dtype(np.float16): 2.0 ** -10, np.dtype(np.float32): 2.0 ** -23, np.dtype(np.float64): 2.0 ** -52,
       np.dtype(ml_dtypes.bfloat16): 2.0 ** -7}

# ---------------------------------------------------------------- float64 references


def conv_reference(x, w, bias=None, group=1, strides=None, dilations=None, pads=None):
    """ONNX Conv: x (N, C_in, *S), w (C_out, C_in/group, *k), pads [begin..., end...]."""
    nd = x.ndim - 2
    strides = strides or [1] * nd
    dilations = dilations or [1] * nd
    pads = pads or [0] * (2 * nd)
    kernel = w.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    out = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    c_out, in_per_group = w.shape[:2]
    out_per_group = c_out // group
    y = np.zeros((x.shape[0], c_out) + tuple(out))
    for g in range(group):
        xg = xp[:, g * in_per_group:(g + 1) * in_per_group]
        wg = w[g * out_per_group:(g + 1) * out_per_group]
        for tap in np.ndindex(*kernel):
            window = tuple(slice(tap[i] * dilations[i], tap[i] * dilations[i] + strides[i] * (out[i] - 1) + 1,
                                 strides[i]) for i in range(nd))
            patch = xg[(slice(None), slice(None)) + window]
            y[:, g * out_per_group:(g + 1) * out_per_group] += np.einsum(
                "nc...,oc->no...", patch, wg[(slice(None), slice(None)) + tap])
    if bias is not None:
        y += bias.reshape((1, -1) + (1,) * nd)
    return y


def conv_transpose_reference(x, w, bias=None, group=1, strides=None, dilations=None, pads=None,
                             output_padding=None):
    """ONNX ConvTranspose: x (N, C_in, *S), w (C_in, C_out/group, *k); scatter each tap, then crop pads."""
    nd = x.ndim - 2
    strides = strides or [1] * nd
    dilations = dilations or [1] * nd
    pads = pads or [0] * (2 * nd)
    output_padding = output_padding or [0] * nd
    kernel = w.shape[2:]
    c_in, out_per_group = w.shape[:2]
    in_per_group = c_in // group
    size = x.shape[2:]
    full = [strides[i] * (size[i] - 1) + dilations[i] * (kernel[i] - 1) + 1 + output_padding[i]
            for i in range(nd)]
    y = np.zeros((x.shape[0], out_per_group * group) + tuple(full))
    for g in range(group):
        xg = x[:, g * in_per_group:(g + 1) * in_per_group]
        wg = w[g * in_per_group:(g + 1) * in_per_group]
        for tap in np.ndindex(*kernel):
            window = tuple(slice(tap[i] * dilations[i], tap[i] * dilations[i] + strides[i] * (size[i] - 1) + 1,
                                 strides[i]) for i in range(nd))
            y[(slice(None), slice(g * out_per_group, (g + 1) * out_per_group)) + window] += np.einsum(
                "nc...,co->no...", xg, wg[(slice(None), slice(None)) + tap])
    crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
    y = y[(slice(None), slice(None)) + crop]
    if bias is not None:
        y = y + bias.reshape((1, -1) + (1,) * nd)
    return y


def gemm_reference(a, b, c=None, alpha=1.0, beta=1.0, trans_a=0, trans_b=0):
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    y = alpha * (a @ b)
    return y if c is None else y + beta * c


def apply_along(affine, x, axis):
    shape = [1] * x.ndim
    shape[axis] = affine.channels
    return affine.scale.reshape(shape) * x + affine.shift.reshape(shape)


def random_affine(rng, channels):
    return ChannelAffine(rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels),
                         rng.standard_normal(channels))


def frozen(a):
    """A read-only copy: any in-place write by the code under test raises."""
    if a is None:
        return None
    a = np.array(a)
    a.setflags(write=False)
    return a


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        if b is None:
            assert a is None
        else:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def assert_close(got, expected, dtype, magnitude):
    """float64: 1e-12 relative to the output's magnitude. Otherwise: the folded tensors were rounded to
    dtype (half an ulp each), so the output can move by about eps(dtype) times the sum of |terms|
    (`magnitude`, an elementwise bound computed by the test from absolute values)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))
    else:
        err = np.abs(got - expected)
        assert (err <= EPS[dtype] * magnitude + 1e-12).all(), err.max()


# ---------------------------------------------------------------- the references against onnxruntime


def test_conv_reference_matches_onnxruntime():
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 2)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    attrs = dict(group=2, strides=[2, 1], dilations=[1, 2], pads=[1, 0, 2, 1])
    model = single_node_model("Conv", [("x", x)], [("y", 1)], 13, attrs, initializers=[("w", w), ("b", bias)])
    (expected,) = run_ort(model, {"x": x}).values()
    got = conv_reference(f64(x), f64(w), f64(bias), **attrs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_transpose_reference_matches_onnxruntime():
    rng = np.random.default_rng(SEED + 1)
    x = rng.standard_normal((2, 4, 5, 4)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    attrs = dict(group=2, strides=[2, 3], dilations=[1, 2], pads=[1, 0, 0, 1], output_padding=[1, 2])
    model = single_node_model("ConvTranspose", [("x", x)], [("y", 1)], 13, attrs,
                              initializers=[("w", w), ("b", bias)])
    (expected,) = run_ort(model, {"x": x}).values()
    got = conv_transpose_reference(f64(x), f64(w), f64(bias), **attrs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_gemm_reference_matches_onnxruntime():
    rng = np.random.default_rng(SEED + 2)
    a = rng.standard_normal((5, 3)).astype(np.float32)
    b = rng.standard_normal((4, 5)).astype(np.float32)
    c = rng.standard_normal((3, 1)).astype(np.float32)
    attrs = dict(alpha=0.7, beta=-1.5, transA=1, transB=1)
    model = single_node_model("Gemm", [("a", a)], [("y", 1)], 13, attrs, initializers=[("b", b), ("c", c)])
    (expected,) = run_ort(model, {"a": a}).values()
    got = gemm_reference(f64(a), f64(b), f64(c), 0.7, -1.5, 1, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- Conv

CONV_CASES = [
    # (input shape, C_out, kernel, group, strides, dilations, pads)
    ((2, 3, 11), 4, (3,), 1, [2], [1], [1, 2]),
    ((2, 4, 10), 6, (2,), 2, [1], [3], [0, 0]),
    ((1, 4, 9, 8), 6, (3, 3), 1, [1, 2], [1, 1], [1, 1, 1, 1]),
    ((2, 6, 8, 9), 9, (3, 2), 3, [2, 1], [1, 2], [2, 0, 1, 1]),
    ((1, 5, 7, 7), 5, (3, 3), 5, [1, 1], [2, 2], [0, 0, 0, 0]),
    ((1, 5, 7, 7), 10, (1, 1), 5, [2, 2], [1, 1], [0, 0, 0, 0]),
    ((1, 4, 5, 6, 7), 6, (3, 2, 3), 2, [1, 2, 1], [1, 1, 2], [1, 0, 1, 1, 1, 0]),
    ((2, 2, 4, 5, 4), 3, (2, 2, 2), 1, [2, 2, 1], [1, 1, 1], [0, 0, 0, 0, 0, 0]),
]


def conv_case(rng, input_shape, c_out, kernel, group, dtype, with_bias):
    x = rng.standard_normal(input_shape)
    w = frozen((rng.standard_normal((c_out, input_shape[1] // group) + kernel)).astype(dtype))
    bias = frozen(rng.standard_normal(c_out).astype(dtype)) if with_bias else None
    return x, w, bias


@pytest.mark.parametrize("input_shape, c_out, kernel, group, strides, dilations, pads", CONV_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_conv(input_shape, c_out, kernel, group, strides, dilations, pads, dtype, with_bias):
    rng = np.random.default_rng(SEED + 10)
    x, w, bias = conv_case(rng, input_shape, c_out, kernel, group, dtype, with_bias)
    affine = random_affine(rng, c_out)
    before = [w.copy(), None if bias is None else bias.copy()]
    attrs = dict(group=group, strides=strides, dilations=dilations, pads=pads)
    expected = apply_along(affine, conv_reference(x, f64(w), f64(bias), **attrs), 1)
    new_w, new_bias = fold_into_conv(w, bias, affine, group)
    assert new_w.dtype == w.dtype and new_w.shape == w.shape
    assert new_bias.dtype == np.dtype(dtype) and new_bias.shape == (c_out,)
    got = conv_reference(x, f64(new_w), f64(new_bias), **attrs)
    magnitude = conv_reference(np.abs(x), np.abs(f64(new_w)), np.abs(f64(new_bias)), **attrs)
    assert_close(got, expected, dtype, magnitude)
    assert_unchanged(before, [w, bias])


@pytest.mark.parametrize("input_shape, c_out, kernel, group, strides, dilations, pads", CONV_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_forward_into_unpadded_conv(input_shape, c_out, kernel, group, strides, dilations, pads, dtype,
                                         with_bias):
    rng = np.random.default_rng(SEED + 11)
    x, w, bias = conv_case(rng, input_shape, c_out, kernel, group, dtype, with_bias)
    affine = random_affine(rng, input_shape[1])
    before = [w.copy(), None if bias is None else bias.copy()]
    attrs = dict(group=group, strides=strides, dilations=dilations)
    expected = conv_reference(apply_along(affine, x, 1), f64(w), f64(bias), **attrs)
    new_w, new_bias = fold_forward_into_conv(w, bias, affine, group)
    assert new_w.dtype == w.dtype and new_w.shape == w.shape
    assert new_bias.dtype == np.dtype(dtype) and new_bias.shape == (c_out,)
    got = conv_reference(x, f64(new_w), f64(new_bias), **attrs)
    magnitude = conv_reference(np.abs(x), np.abs(f64(new_w)), np.abs(f64(new_bias)), **attrs)
    assert_close(got, expected, dtype, magnitude)
    assert_unchanged(before, [w, bias])


def test_forward_fold_into_a_padded_conv_would_be_wrong():
    # Why the caller must refuse it: the padded zeros are not shifted by the map.
    rng = np.random.default_rng(SEED + 12)
    x, w, bias = conv_case(rng, (1, 3, 6, 6), 4, (3, 3), 1, np.float64, True)
    affine = random_affine(rng, 3)
    expected = conv_reference(apply_along(affine, x, 1), w, bias, pads=[1, 1, 1, 1])
    new_w, new_bias = fold_forward_into_conv(w, bias, affine, 1)
    got = conv_reference(x, new_w, new_bias, pads=[1, 1, 1, 1])
    np.testing.assert_allclose(got[:, :, 1:-1, 1:-1], expected[:, :, 1:-1, 1:-1], rtol=1e-12, atol=1e-12)
    assert np.abs(got - expected).max() > 1e-3


# ---------------------------------------------------------------- ConvTranspose

CONV_TRANSPOSE_CASES = [
    # (input shape, C_out, kernel, group, strides, dilations, pads, output_padding)
    ((2, 3, 6), 4, (3,), 1, [2], [1], [1, 0], [1]),
    ((2, 4, 5), 6, (2,), 2, [3], [2], [0, 1], [2]),
    ((1, 4, 5, 4), 6, (3, 2), 2, [2, 3], [1, 2], [1, 0, 0, 1], [1, 2]),
    ((2, 6, 4, 5), 9, (2, 3), 3, [1, 2], [1, 1], [0, 0, 0, 0], [0, 1]),
    ((1, 4, 4, 4), 4, (3, 3), 4, [2, 2], [1, 1], [1, 1, 1, 1], [1, 1]),
    ((1, 4, 3, 4, 3), 6, (2, 3, 2), 2, [2, 1, 2], [1, 1, 2], [0, 1, 0, 1, 0, 0], [1, 0, 1]),
    ((1, 2, 3, 3, 4), 3, (3, 2, 2), 1, [1, 2, 1], [2, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0]),
]


def conv_transpose_case(rng, input_shape, c_out, kernel, group, dtype, with_bias):
    x = rng.standard_normal(input_shape)
    w = frozen(rng.standard_normal((input_shape[1], c_out // group) + kernel).astype(dtype))
    bias = frozen(rng.standard_normal(c_out).astype(dtype)) if with_bias else None
    return x, w, bias


@pytest.mark.parametrize("input_shape, c_out, kernel, group, strides, dilations, pads, output_padding",
                         CONV_TRANSPOSE_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_conv_transpose(input_shape, c_out, kernel, group, strides, dilations, pads, output_padding,
                                  dtype, with_bias):
    rng = np.random.default_rng(SEED + 20)
    x, w, bias = conv_transpose_case(rng, input_shape, c_out, kernel, group, dtype, with_bias)
    affine = random_affine(rng, c_out)
    before = [w.copy(), None if bias is None else bias.copy()]
    attrs = dict(group=group, strides=strides, dilations=dilations, pads=pads, output_padding=output_padding)
    expected = apply_along(affine, conv_transpose_reference(x, f64(w), f64(bias), **attrs), 1)
    new_w, new_bias = fold_into_conv_transpose(w, bias, affine, group)
    assert new_w.dtype == w.dtype and new_w.shape == w.shape
    assert new_bias.dtype == np.dtype(dtype) and new_bias.shape == (c_out,)
    got = conv_transpose_reference(x, f64(new_w), f64(new_bias), **attrs)
    magnitude = conv_transpose_reference(np.abs(x), np.abs(f64(new_w)), np.abs(f64(new_bias)), **attrs)
    assert_close(got, expected, dtype, magnitude)
    assert_unchanged(before, [w, bias])


def test_grouped_conv_transpose_scales_the_output_axis_per_group():
    # C_in 4, group 2, C_out/group 3: output channel g*3 + j is column j of rows [2g, 2g+2).
    w = np.ones((4, 3, 1))
    affine = ChannelAffine(np.arange(1.0, 7.0), np.zeros(6))
    new_w, _ = fold_into_conv_transpose(w, None, affine, 2)
    np.testing.assert_array_equal(new_w[:, :, 0], [[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6]])


@pytest.mark.parametrize("input_shape, c_out, group, dtype", [
    ((2, 4, 5, 3), 6, 2, np.float64), ((1, 6, 4), 9, 3, np.float32), ((1, 3, 2, 2, 3), 2, 1, np.float16),
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_forward_into_1x1_stride_1_conv_transpose(input_shape, c_out, group, dtype, with_bias):
    rng = np.random.default_rng(SEED + 21)
    kernel = (1,) * (len(input_shape) - 2)
    x, w, bias = conv_transpose_case(rng, input_shape, c_out, kernel, group, dtype, with_bias)
    affine = random_affine(rng, input_shape[1])
    before = [w.copy(), None if bias is None else bias.copy()]
    expected = conv_transpose_reference(apply_along(affine, x, 1), f64(w), f64(bias), group=group)
    new_w, new_bias = fold_forward_into_conv_transpose(w, bias, affine, group, strides=[1] * len(kernel))
    assert new_w.dtype == w.dtype and new_bias.dtype == np.dtype(dtype) and new_bias.shape == (c_out,)
    got = conv_transpose_reference(x, f64(new_w), f64(new_bias), group=group)
    magnitude = conv_transpose_reference(np.abs(x), np.abs(f64(new_w)), np.abs(f64(new_bias)), group=group)
    assert_close(got, expected, dtype, magnitude)
    assert_unchanged(before, [w, bias])


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_forward_into_conv_transpose_with_zero_shift(with_bias):
    rng = np.random.default_rng(SEED + 22)
    x, w, bias = conv_transpose_case(rng, (2, 4, 5, 4), 6, (3, 2), 2, np.float64, with_bias)
    affine = ChannelAffine(rng.uniform(0.5, 2.0, 4), np.zeros(4))
    attrs = dict(group=2, strides=[2, 1], dilations=[1, 2], output_padding=[1, 0])
    expected = conv_transpose_reference(apply_along(affine, x, 1), w, bias, **attrs)
    new_w, new_bias = fold_forward_into_conv_transpose(w, bias, affine, 2)
    np.testing.assert_allclose(conv_transpose_reference(x, new_w, new_bias, **attrs), expected,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel, strides", [((3, 2), [1, 1]), ((3, 2), None), ((1, 1), None),
                                             ((1, 1), [2, 1])])
def test_forward_fold_of_a_shift_into_conv_transpose_is_refused_unless_exact(kernel, strides):
    rng = np.random.default_rng(SEED + 23)
    x, w, bias = conv_transpose_case(rng, (1, 4, 5, 4), 6, kernel, 2, np.float64, True)
    affine = random_affine(rng, 4)
    # The reference confirms the trap: what the shift adds varies over output positions.
    ref_strides = strides or [1, 1]
    shifted = conv_transpose_reference(apply_along(affine, x, 1), w, bias, group=2, strides=ref_strides)
    scaled = conv_transpose_reference(apply_along(ChannelAffine(affine.scale, np.zeros(4)), x, 1), w, bias,
                                      group=2, strides=ref_strides)
    added = (shifted - scaled)[0].reshape(6, -1)
    if strides is not None:
        assert np.abs(added - added[:, :1]).max() > 1e-3
    with pytest.raises(ValueError, match="ConvTranspose"):
        fold_forward_into_conv_transpose(w, bias, affine, 2, strides=strides)


# ---------------------------------------------------------------- Gemm

C_SHAPES = [None, (), (1,), (5,), (1, 1), (1, 5), (3, 1), (3, 5)]


@pytest.mark.parametrize("c_shape", C_SHAPES)
@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 2.5), (-1.25, 0.0), (2.0, -0.75)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_fold_into_gemm(c_shape, trans_a, trans_b, alpha, beta, dtype):
    rng = np.random.default_rng(SEED + 30)
    m, k, n = 3, 4, 5
    a = rng.standard_normal((k, m) if trans_a else (m, k))
    b = frozen(rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype))
    c = None if c_shape is None else frozen(rng.standard_normal(c_shape).astype(dtype))
    affine = random_affine(rng, n)
    before = [b.copy(), None if c is None else c.copy()]
    expected = apply_along(affine, gemm_reference(a, f64(b), f64(c), alpha, beta, trans_a, trans_b), 1)
    new_b, new_c, new_beta = fold_into_gemm(b, c, affine, alpha, beta, trans_b)
    assert new_beta == 1.0
    assert new_b.dtype == b.dtype and new_b.shape == b.shape and new_c.dtype == np.dtype(dtype)
    expected_c_shape = (n,) if c_shape is None or len(c_shape) < 2 else (c_shape[0], n)
    assert new_c.shape == expected_c_shape
    got = gemm_reference(a, f64(new_b), f64(new_c), alpha, 1.0, trans_a, trans_b)
    magnitude = gemm_reference(np.abs(a), np.abs(f64(new_b)), np.abs(f64(new_c)), abs(alpha), 1.0, trans_a,
                               trans_b)
    assert_close(got, expected, dtype, magnitude)
    assert_unchanged(before, [b, c])


@pytest.mark.parametrize("c_shape", C_SHAPES)
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 2.5), (-1.25, 0.0)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_fold_forward_into_gemm(c_shape, trans_b, alpha, beta, dtype):
    rng = np.random.default_rng(SEED + 31)
    m, k, n = 3, 4, 5
    x = rng.standard_normal((m, k))
    b = frozen(rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype))
    c = None if c_shape is None else frozen(rng.standard_normal(c_shape).astype(dtype))
    affine = random_affine(rng, k)
    before = [b.copy(), None if c is None else c.copy()]
    expected = gemm_reference(apply_along(affine, x, 1), f64(b), f64(c), alpha, beta, 0, trans_b)
    new_b, new_c, new_beta = fold_forward_into_gemm(b, c, affine, alpha, beta, trans_b)
    assert new_beta == 1.0
    assert new_b.dtype == b.dtype and new_b.shape == b.shape and new_c.dtype == np.dtype(dtype)
    assert new_c.shape == ((n,) if c_shape is None or len(c_shape) < 2 else (c_shape[0], n))
    got = gemm_reference(x, f64(new_b), f64(new_c), alpha, 1.0, 0, trans_b)
    magnitude = gemm_reference(np.abs(x), np.abs(f64(new_b)), np.abs(f64(new_c)), abs(alpha), 1.0, 0, trans_b)
    assert_close(got, expected, dtype, magnitude)
    assert_unchanged(before, [b, c])


# ---------------------------------------------------------------- MatMul

BIAS_SHAPES = [None, (), (1,), (5,), (1, 5), (1, 1), (3, 5)]


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_fold_into_matmul(bias_shape, dtype):
    rng = np.random.default_rng(SEED + 40)
    x = rng.standard_normal((3, 4))
    w = frozen(rng.standard_normal((4, 5)).astype(dtype))
    bias = None if bias_shape is None else frozen(rng.standard_normal(bias_shape).astype(dtype))
    affine = random_affine(rng, 5)
    before = [w.copy(), None if bias is None else bias.copy()]
    expected = apply_along(affine, x @ f64(w) + (0.0 if bias is None else f64(bias)), 1)
    new_w, new_bias = fold_into_matmul(w, bias, affine)
    assert new_w.dtype == w.dtype and new_bias.dtype == np.dtype(dtype)
    assert new_bias.shape == ((5,) if bias_shape is None or len(bias_shape) < 2 else (bias_shape[0], 5))
    got = x @ f64(new_w) + f64(new_bias)
    assert_close(got, expected, dtype, np.abs(x) @ np.abs(f64(new_w)) + np.abs(f64(new_bias)))
    assert_unchanged(before, [w, bias])


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_fold_forward_into_matmul(bias_shape, dtype):
    rng = np.random.default_rng(SEED + 41)
    x = rng.standard_normal((3, 4))
    w = frozen(rng.standard_normal((4, 5)).astype(dtype))
    bias = None if bias_shape is None else frozen(rng.standard_normal(bias_shape).astype(dtype))
    affine = random_affine(rng, 4)
    before = [w.copy(), None if bias is None else bias.copy()]
    expected = apply_along(affine, x, 1) @ f64(w) + (0.0 if bias is None else f64(bias))
    new_w, new_bias = fold_forward_into_matmul(w, bias, affine)
    assert new_w.dtype == w.dtype and new_bias.dtype == np.dtype(dtype)
    assert new_bias.shape == ((5,) if bias_shape is None or len(bias_shape) < 2 else (bias_shape[0], 5))
    got = x @ f64(new_w) + f64(new_bias)
    assert_close(got, expected, dtype, np.abs(x) @ np.abs(f64(new_w)) + np.abs(f64(new_bias)))
    assert_unchanged(before, [w, bias])


# ---------------------------------------------------------------- dtypes, overflow and bad arguments


def test_bfloat16_weights_come_back_as_bfloat16():
    rng = np.random.default_rng(SEED + 50)
    x = rng.standard_normal((2, 3, 6))
    w = rng.standard_normal((4, 3, 3)).astype(ml_dtypes.bfloat16)
    affine = random_affine(rng, 4)
    new_w, new_bias = fold_into_conv(w, None, affine, 1)
    assert new_w.dtype == w.dtype and new_bias.dtype == w.dtype
    expected = apply_along(affine, conv_reference(x, f64(w)), 1)
    got = conv_reference(x, f64(new_w), f64(new_bias))
    assert_close(got, expected, w.dtype, conv_reference(np.abs(x), np.abs(f64(new_w)), np.abs(f64(new_bias))))


def test_bias_keeps_its_own_dtype():
    w = np.ones((2, 1, 1), dtype=np.float32)
    bias = np.ones(2, dtype=np.float64)
    new_w, new_bias = fold_into_conv(w, bias, ChannelAffine([2.0, 3.0], [0.1, 0.2]), 1)
    assert new_w.dtype == np.float32 and new_bias.dtype == np.float64
    np.testing.assert_array_equal(new_bias, [2.1, 3.2])


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("block_elements", [1, 7, 2**18])
def test_folded_conv_weight_is_computed_a_block_of_rows_at_a_time(monkeypatch, dtype, block_elements):
    monkeypatch.setattr(absorb, "_ROW_BLOCK_ELEMENTS", block_elements)  # one row, 3 rows with a short last, all
    rng = np.random.default_rng(SEED + 80)
    w = rng.standard_normal((8, 2, 1, 2)).astype(dtype)
    affine = random_affine(rng, 8)
    new_w, _ = fold_into_conv(w, None, affine, 1)
    expected = (f64(w) * affine.scale[:, None, None, None]).astype(dtype)  # each value rounded once
    if block_elements >= w.size:  # one block or less: computed at once
        assert isinstance(new_w, np.ndarray) and new_w.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(new_w, expected)
        return
    assert isinstance(new_w, absorb.ScaledRows)
    blocks = list(new_w.blocks())
    assert len(blocks) == -(-8 // max(1, block_elements // 4))
    np.testing.assert_array_equal(np.concatenate(blocks), expected)
    got = np.asarray(new_w)
    assert got.dtype == np.dtype(dtype) and got.shape == w.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.asarray(new_w, dtype=np.float64), f64(expected))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("seed", range(6))
def test_overflow_check_of_a_folded_conv_weight_matches_every_value(dtype, seed):
    # Weights near the dtype's largest value, scales around 1, some rows with inf or nan: overflows() judges
    # from each row's largest magnitude; the reference scales and rounds every value.
    rng = np.random.default_rng(SEED + 90 + seed)
    finfo = ml_dtypes.finfo(dtype) if dtype is ml_dtypes.bfloat16 else np.finfo(dtype)
    w = (rng.uniform(-1.0, 1.0, (6, 3, 2)) * float(finfo.max)).astype(dtype)
    w[0, 0, 0] = finfo.max  # a scale of 1 + eps then rounds to infinity or back to max
    scales = [0.5, 0.999, 1.0, 1.0 + float(finfo.eps), 1.5, -2.0, 0.0] if seed < 3 else [0.5, -0.25, 1.0, 0.0]
    scale = rng.choice(scales, size=6)
    if seed % 3 == 1:
        w[rng.integers(6), 0, 0] = np.inf
    if seed % 3 == 2:
        w[rng.integers(6), 1, 1] = np.nan
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = (f64(w) * scale[:, None, None]).astype(dtype)
    expected = bool(np.isfinite(f64(w)).all() and not np.isfinite(f64(scaled)).all())
    assert absorb.ScaledRows(w, scale).overflows() == expected
    if expected:
        with pytest.raises(ValueError, match="weight does not fit in"):
            fold_into_conv(w, None, ChannelAffine(scale, np.zeros(6)), 1)


def test_fold_that_overflows_float16_is_refused():
    w = np.full((2, 1, 1), 40000.0, dtype=np.float16)
    with pytest.raises(ValueError, match="weight does not fit in float16"):
        fold_into_conv(w, None, ChannelAffine([2.0, 1.0], [0.0, 0.0]), 1)
    with pytest.raises(ValueError, match="bias does not fit in float16"):
        fold_into_conv(np.ones((2, 1, 1), np.float16), None, ChannelAffine([1.0, 1.0], [7e4, 0.0]), 1)


@pytest.mark.parametrize("call, message", [
    (lambda: fold_into_conv(np.ones((4, 2, 3)), None, ChannelAffine.identity(3), 1), "3 channels"),
    (lambda: fold_into_conv(np.ones((4, 2)), None, ChannelAffine.identity(4), 1), "at least 3 dims"),
    (lambda: fold_into_conv(np.ones((4, 2, 3)), np.ones(3), ChannelAffine.identity(4), 1), r"bias must .*\(4,\)"),
    (lambda: fold_into_conv(np.ones((4, 2, 3)), None, ChannelAffine.identity(4), 3), "divisible by group"),
    (lambda: fold_into_conv(np.ones((4, 2, 3)), None, ChannelAffine.identity(4), 0), "group"),
    (lambda: fold_into_conv(np.ones((4, 2, 3), np.int32), None, ChannelAffine.identity(4), 1), "float"),
    (lambda: fold_into_conv_transpose(np.ones((4, 3, 3)), None, ChannelAffine.identity(3), 2), "6"),
    (lambda: fold_into_conv_transpose(np.ones((5, 3, 3)), None, ChannelAffine.identity(6), 2), "C_in"),
    (lambda: fold_forward_into_conv(np.ones((4, 2, 3)), None, ChannelAffine.identity(2), 2), "input"),
    (lambda: fold_into_gemm(np.ones((4, 5)), None, ChannelAffine.identity(4), 1.0, 1.0, 0), "N"),
    (lambda: fold_into_gemm(np.ones((4, 5)), np.ones(4), ChannelAffine.identity(5), 1.0, 1.0, 0), "c must"),
    (lambda: fold_into_gemm(np.ones((4, 5)), np.ones((1, 1, 5)), ChannelAffine.identity(5), 1., 1., 0), "rank"),
    (lambda: fold_into_gemm(np.ones(5), None, ChannelAffine.identity(5), 1.0, 1.0, 0), "2-D"),
    (lambda: fold_forward_into_gemm(np.ones((4, 5)), None, ChannelAffine.identity(5), 1.0, 1.0, 0), "K"),
    (lambda: fold_into_matmul(np.ones((4, 5, 1)), None, ChannelAffine.identity(5)), "2-D"),
    (lambda: fold_forward_into_matmul(np.ones((4, 5)), np.ones(4), ChannelAffine.identity(4)), "bias must"),
])
def test_bad_arguments_raise_value_error_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_affine_must_be_a_channel_affine():
    with pytest.raises(TypeError, match="ChannelAffine"):
        fold_into_conv(np.ones((2, 1, 1)), None, (np.ones(2), np.zeros(2)), 1)


# ---------------------------------------------------------------- Mul/Add rewrite


@pytest.mark.parametrize("shape, channel_axis, expected_shape", [
    ((2, 3, 4, 5), 1, (3, 1, 1)), ((2, 3), 1, (3,)), ((2, 3, 7), 1, (3, 1)), ((2, 3, 2, 2, 2), 1, (3, 1, 1, 1)),
    ((2, 3, 4, 5), -3, (3, 1, 1)), ((4, 5, 3), 2, (3,)), ((3,), 0, (3,)),
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_affine_as_mul_add_broadcasts_along_the_channel_axis(shape, channel_axis, expected_shape, dtype):
    rng = np.random.default_rng(SEED + 60)
    affine = random_affine(rng, 3)
    x = rng.standard_normal(shape).astype(dtype)
    mul, add = affine_as_mul_add(affine, len(shape), channel_axis, dtype)
    assert mul.shape == expected_shape and add.shape == expected_shape
    assert mul.dtype == np.dtype(dtype) and add.dtype == np.dtype(dtype)
    got = f64(x) * f64(mul) + f64(add)
    expected = apply_along(affine, f64(x), channel_axis % len(shape))
    magnitude = np.abs(f64(x) * f64(mul)) + np.abs(f64(add))
    assert_close(got, expected, dtype, magnitude)


def test_affine_as_mul_add_rejects_bad_arguments():
    affine = ChannelAffine.identity(3)
    with pytest.raises(ValueError, match="channel_axis"):
        affine_as_mul_add(affine, 2, 2, np.float32)
    with pytest.raises(ValueError, match="rank"):
        affine_as_mul_add(affine, 0, 0, np.float32)
    with pytest.raises(ValueError, match="does not fit in float16"):
        affine_as_mul_add(ChannelAffine([1e6, 1.0, 1.0], np.zeros(3)), 4, 1, np.float16)
