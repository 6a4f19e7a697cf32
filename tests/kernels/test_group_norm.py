"""group_norm and group_norm_backward against a float64 NumPy reference, finite differences, onnxruntime
and the ONNX backend node test cases."""
import numpy as np
import pytest

from foldnorm.kernels.group_normalization import group_norm, group_norm_backward
from tests.kernels.kernel_refs import (
    DTYPES,
    assert_backward_matches,
    assert_bit_identical_across_threads,
    assert_close,
    assert_forward_matches,
    assert_gradients_match_finite_differences,
    make_inputs,
    reference_group_norm,
    reference_group_norm_backward,
    run_node_in_ort,
)
from tests.onnx_cases import backend_node_cases, node_attributes

# (shape, num_groups): 0 to 3 spatial dims, odd sizes, C = 1, N = 1, num_groups 1, C and in between,
# C not a multiple of 8.  The last ones have fewer than 32 (n, group) blocks and at least two statistics
# blocks of values per group, so the kernel cuts groups into units of whole planes or of plane chunks.
SHAPES = [
    ((5, 6), 3),
    ((3, 1), 1),
    ((4, 6, 9), 1),
    ((4, 6, 9), 6),
    ((3, 15, 7, 5), 5),
    ((2, 12, 4, 3, 5), 4),
    ((1, 10, 7, 5), 2),
    ((7, 1, 5, 3), 1),
    ((6, 13, 3), 13),
    ((9, 14, 2, 3), 7),
    ((1, 6, 64, 64), 2),
    ((1, 64, 40, 40), 1),
    ((1, 3, 4099), 1),
    ((2, 3, 2, 2900), 3),
]


def shape_id(case):
    shape, groups = case
    return "x".join(map(str, shape)) + "_g%d" % groups


# ---------------------------------------------------------------------------------------------------
# Forward and backward against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_forward_matches_reference(case, dtype, affine):
    shape, groups = case
    x, weight, bias = make_inputs(shape, dtype, seed=len(shape) * 100 + groups, affine=affine)
    actual = group_norm(x, groups, weight, bias, eps=1e-3)
    assert_forward_matches(actual, reference_group_norm(x, groups, weight, bias, eps=1e-3), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_backward_matches_reference(case, dtype, affine):
    shape, groups = case
    x, weight, _ = make_inputs(shape, dtype, seed=len(shape) * 10 + groups, affine=affine)
    dy = np.random.default_rng(groups).standard_normal(shape).astype(dtype)
    _, mean, invstd = group_norm(x, groups, weight, eps=1e-3)
    actual = group_norm_backward(dy, x, mean, invstd, groups, weight)
    assert_backward_matches(actual, reference_group_norm_backward(dy, x, groups, weight, eps=1e-3), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", [((4, 64, 181, 191), 32), ((1, 2, 4100, 1031), 1)], ids=shape_id)
def test_outputs_of_32_mib_or_more_are_streamed_correctly(case, dtype):
    """y this large is written with non-temporal stores from an L1 piece; planes of an odd length start
    off the 16-byte boundary the stores need, and the second shape's groups are cut into plane chunks."""
    shape, groups = case
    assert np.prod(shape) * np.dtype(np.float32).itemsize >= 32 << 20
    x, weight, bias = make_inputs(shape, dtype, seed=77)
    actual = group_norm(x, groups, weight, bias)
    assert_forward_matches(actual, reference_group_norm(x, groups, weight, bias), dtype)


@pytest.mark.parametrize(
    "case", [((2, 6, 3), 3), ((1, 4, 2, 3), 1), ((3, 5), 5), ((2, 4, 2, 2, 2), 2)], ids=shape_id
)
def test_gradients_match_finite_differences(case):
    shape, groups = case
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    weight = rng.uniform(0.5, 1.5, shape[1])
    bias = rng.standard_normal(shape[1])
    dy = rng.standard_normal(shape)
    _, mean, invstd = group_norm(x, groups, weight, bias)
    assert_gradients_match_finite_differences(
        lambda x_, weight_, bias_: reference_group_norm(x_, groups, weight_, bias_),
        dy,
        (x, weight, bias),
        reference_group_norm_backward(dy, x, groups, weight),
        group_norm_backward(dy, x, mean, invstd, groups, weight),
    )


# ---------------------------------------------------------------------------------------------------
# Adversarial data


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_large_mean_small_spread(dtype):
    rng = np.random.default_rng(3)
    x = (1e4 + 1e-2 * rng.standard_normal((2, 6, 40, 50))).astype(dtype)
    y, mean, _ = group_norm(x, 3)
    expected_y, expected_mean, _ = reference_group_norm(x, 3)
    # float32 x near 1e4 is spaced 1e-3 apart, a tenth of the spread: the normalized values must still
    # be those of the stored x, to a few float32 roundings of y.
    assert_close(y, expected_y, dtype, scale=4.0)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-7 if dtype == np.float32 else 1e-14)
    dy = rng.standard_normal(x.shape).astype(dtype)
    if dtype == np.float64:
        _, mean, invstd = group_norm(x, 3)
        dx, dweight, dbias = group_norm_backward(dy, x, mean, invstd, 3)
        expected = reference_group_norm_backward(dy, x, 3)
        np.testing.assert_allclose(dx, expected[0], rtol=1e-7, atol=1e-7 * np.abs(expected[0]).max())
        np.testing.assert_allclose(dweight, expected[1], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_constant_group_gives_bias(dtype):
    x = np.full((2, 4, 3, 3), 3.25, dtype=dtype)
    x[:, 2:] = -7.5
    weight = np.array([2.0, 3.0, 4.0, 5.0], dtype=dtype)
    bias = np.array([0.5, -1.0, 0.25, 2.0], dtype=dtype)
    y, mean, invstd = group_norm(x, 2, weight, bias)
    np.testing.assert_array_equal(y, np.broadcast_to(bias.reshape(1, 4, 1, 1), x.shape))
    np.testing.assert_array_equal(mean, [[3.25, -7.5], [3.25, -7.5]])
    np.testing.assert_allclose(invstd, 1 / np.sqrt(1e-5), rtol=1e-6)
    dy = np.ones_like(x)
    dx, _, dbias = group_norm_backward(dy, x, mean, invstd, 2, weight)
    assert_close(dx, reference_group_norm_backward(dy, x, 2, weight)[0], dtype, scale=4.0)
    np.testing.assert_array_equal(dbias, [18.0, 18.0, 18.0, 18.0])


def test_values_near_float32_limit():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 6, 5, 7)) * 1e30 + 5e29).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    y, mean, invstd = group_norm(x, 3, weight)
    expected_y, expected_mean, expected_invstd = reference_group_norm(x, 3, weight)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(invstd))
    assert_close(y, expected_y, np.float32)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(invstd, expected_invstd, rtol=1e-6)


@pytest.mark.parametrize("scale,eps", [(1e-22, 0.0), (1e20, 1e-5)])
def test_backward_of_extreme_magnitudes_float32(scale, eps):
    """dy and x near 1e-22 (products below float32's range) and near 1e20 (products beyond it)."""
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((2, 6, 5, 7)) * scale).astype(np.float32)
    dy = (rng.standard_normal(x.shape) * scale).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    _, mean, invstd = group_norm(x, 3, weight, eps=eps)
    actual = group_norm_backward(dy, x, mean, invstd, 3, weight)
    expected = reference_group_norm_backward(dy, x, 3, weight, eps=eps)
    for got, want in zip(actual, expected):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_poison_only_their_group(dtype, bad):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 4, 4)).astype(dtype)
    x[1, 3, 2, 1] = bad  # sample 1, group 1 of 3
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, mean, invstd = group_norm(x, 3)
    assert np.all(np.isnan(y[1, 2:4])) and np.isnan(invstd[1, 1])
    clean = np.ones(x.shape, dtype=bool)
    clean[1, 2:4] = False
    with np.errstate(invalid="ignore"):
        expected_y, _, _ = reference_group_norm(x, 3)
        expected_dx = reference_group_norm_backward(dy, x, 3)[0]
    assert_close(y[clean], expected_y[clean], dtype)
    dx, dweight, dbias = group_norm_backward(dy, x, mean, invstd, 3)
    assert np.all(np.isnan(dx[1, 2:4]))
    assert_close(dx[clean], expected_dx[clean], dtype, scale=4.0)
    assert np.all(np.isnan(dweight[2:4])) and np.all(np.isfinite(dweight[[0, 1, 4, 5]]))
    assert np.all(np.isfinite(dbias))


# ---------------------------------------------------------------------------------------------------
# Threads, layouts


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "case",
    # many blocks (stats and apply fused per block); one sample with 2 groups (units of plane chunks);
    # one group of 64 planes (units of whole planes)
    [((8, 32, 17, 15), 8), ((1, 6, 64, 64), 2), ((1, 64, 40, 40), 1), ((3, 10, 4099), 5)],
    ids=shape_id,
)
def test_one_and_two_threads_are_bit_identical(case, dtype):
    shape, groups = case
    x, weight, bias = make_inputs(shape, dtype, seed=17)
    dy = np.random.default_rng(18).standard_normal(shape).astype(dtype)

    def run(threads):
        y, mean, invstd = group_norm(x, groups, weight, bias, num_threads=threads)
        grads = group_norm_backward(dy, x, mean, invstd, groups, weight, num_threads=threads)
        return (y, mean, invstd) + grads

    assert_bit_identical_across_threads(run, (1, 2))


def test_noncontiguous_and_negative_stride_inputs():
    rng = np.random.default_rng(23)
    base = rng.standard_normal((3, 8, 10, 12)).astype(np.float32)
    weight = rng.standard_normal(16)[::2].astype(np.float32)
    bias = rng.standard_normal(8)[::-1].astype(np.float32)
    views = [
        base[:, :, ::-1, ::2],
        base[::-1, ::-1],
        base.transpose(0, 1, 3, 2),
        np.moveaxis(np.ascontiguousarray(np.moveaxis(base, 1, -1)), -1, 1),
    ]
    for x in views:
        assert not x.flags.c_contiguous
        y, mean, invstd = group_norm(x, 4, weight, bias)
        assert_close(y, reference_group_norm(x, 4, weight, bias)[0], np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)[::-1]
        dx, dweight, dbias = group_norm_backward(dy, x, mean, invstd, 4, weight)
        expected = reference_group_norm_backward(dy, x, 4, weight)
        assert_close(dx, expected[0], np.float32, scale=4.0)
        assert_close(dweight, expected[1], np.float32, scale=20.0)
        assert_close(dbias, expected[2], np.float32, scale=20.0)


# ---------------------------------------------------------------------------------------------------
# Bad input


X = np.zeros((2, 6, 3), dtype=np.float32)
STATS = np.zeros((2, 3), dtype=np.float32)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: group_norm(X.astype(np.int32), 3), TypeError, "x"),
        (lambda: group_norm(np.zeros((0, 6, 3), np.float32), 3), ValueError, "x"),
        (lambda: group_norm(np.zeros(6, np.float32), 3), ValueError, "x"),
        (lambda: group_norm(X, 4), ValueError, "num_groups"),
        (lambda: group_norm(X, 0), ValueError, "num_groups"),
        (lambda: group_norm(X, -3), ValueError, "num_groups"),
        (lambda: group_norm(X, 3.0), TypeError, "num_groups"),
        (lambda: group_norm(X, True), TypeError, "num_groups"),
        (lambda: group_norm(X, None), TypeError, "num_groups"),
        (lambda: group_norm(X, 3, np.ones(5)), ValueError, "weight"),
        (lambda: group_norm(X, 3, None, np.ones((6, 1))), ValueError, "bias"),
        (lambda: group_norm(X, 3, np.array(["a"] * 6)), TypeError, "weight"),
        (lambda: group_norm(X, 3, eps=-1.0), ValueError, "eps"),
        (lambda: group_norm(X, 3, num_threads=0), ValueError, "num_threads"),
        (lambda: group_norm_backward(X[:1], X, STATS, STATS, 3), ValueError, "dy"),
        (lambda: group_norm_backward(X.astype(np.int64), X, STATS, STATS, 3), TypeError, "dy"),
        (lambda: group_norm_backward(X, X, STATS[:, :2], STATS, 3), ValueError, "mean"),
        (lambda: group_norm_backward(X, X, STATS, STATS.T, 3), ValueError, "invstd"),
        (lambda: group_norm_backward(X, X, None, STATS, 3), TypeError, "mean"),
        (lambda: group_norm_backward(X, X, STATS, STATS, 2), ValueError, "mean"),
        (lambda: group_norm_backward(X, X, STATS, STATS, 5), ValueError, "num_groups"),
        (lambda: group_norm_backward(X, X, STATS, STATS, 3, np.ones(3)), ValueError, "weight"),
        (lambda: group_norm_backward(X, X[:, :, :0], STATS, STATS, 3), ValueError, "x"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=r"\b%s\b" % name):
        call()


# ---------------------------------------------------------------------------------------------------
# onnxruntime and the ONNX backend node cases


@pytest.mark.parametrize(
    "case", [((2, 6, 5, 7), 3), ((1, 8, 9), 8), ((3, 12, 4, 3, 2), 1), ((2, 10, 33, 31), 5)], ids=shape_id
)
@pytest.mark.parametrize("epsilon", [1e-5, 1e-2])
def test_matches_onnxruntime_group_normalization(case, epsilon):
    shape, groups = case
    x, weight, bias = make_inputs(shape, np.float32, seed=29)
    inputs = [("X", x), ("scale", weight), ("bias", bias)]
    attrs = {"num_groups": groups, "epsilon": epsilon}
    (expected,) = run_node_in_ort("GroupNormalization", inputs, 21, attrs)
    y, _, _ = group_norm(x, groups, weight, bias, eps=epsilon)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


GROUP_NORM_CASES = backend_node_cases("test_group_normalization")


def test_backend_group_normalization_cases_are_present():
    assert len(GROUP_NORM_CASES) >= 2


@pytest.mark.parametrize("case", GROUP_NORM_CASES, ids=lambda c: c[0])
def test_backend_group_normalization_node_cases(case):
    name, node, inputs, (expected,) = case
    attrs = node_attributes(node)
    groups = attrs["num_groups"]
    x, scale, bias = inputs
    # The installed onnx ships these cases at opset 21 (per-channel scale and bias).  The opset-18 form
    # had one scale and bias per group; expanding each over its group's channels gives the same result.
    if scale.shape[0] != x.shape[1]:
        scale = np.repeat(scale, x.shape[1] // groups)
        bias = np.repeat(bias, x.shape[1] // groups)
    y, _, _ = group_norm(x, groups, scale, bias, eps=attrs.get("epsilon", 1e-5))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

