"""ChannelAffine and the two constructors, against direct float64 NumPy evaluation of the ops they model."""
import ml_dtypes
import numpy as np
import pytest

from foldnorm.fold.core.affine import ChannelAffine, affine_from_batch_norm, affine_from_elementwise
from tests.onnx_cases import backend_node_cases, node_attributes, run_ort, single_node_model

RNG_SEED = 20240611


def apply_along(affine, x, channel_axis):
    """Reference: y = scale[c] * x + shift[c] with c the index along channel_axis."""
    shape = [1] * x.ndim
    shape[channel_axis] = affine.channels
    return affine.scale.reshape(shape) * x + affine.shift.reshape(shape)


def random_affine(rng, channels):
    return ChannelAffine(rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels),
                         rng.standard_normal(channels))


# ---------------------------------------------------------------- ChannelAffine


def test_constructor_copies_to_read_only_float64():
    scale = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    shift = [0.5, -1.0, 2.0]
    affine = ChannelAffine(scale, shift)
    assert affine.scale.dtype == np.float64 and affine.shift.dtype == np.float64
    assert affine.channels == 3
    scale[0] = 100.0
    assert affine.scale[0] == 1.0
    with pytest.raises(ValueError):
        affine.scale[0] = 5.0
    with pytest.raises(AttributeError):
        affine.scale = np.ones(3)


@pytest.mark.parametrize("scale, shift, message", [
    (np.ones((2, 2)), np.zeros((2, 2)), "scale"),
    (np.ones(0), np.zeros(0), "scale"),
    (np.ones(3), np.zeros(4), "shift"),
    (np.array([1.0, np.inf]), np.zeros(2), "finite"),
    (np.ones(2), np.array([0.0, np.nan]), "finite"),
])
def test_constructor_rejects(scale, shift, message):
    with pytest.raises(ValueError, match=message):
        ChannelAffine(scale, shift)


def test_then_equals_applying_both():
    rng = np.random.default_rng(RNG_SEED)
    first, second = random_affine(rng, 5), random_affine(rng, 5)
    x = rng.standard_normal((2, 5, 3, 4))
    composed = first.then(second)
    expected = apply_along(second, apply_along(first, x, 1), 1)
    np.testing.assert_allclose(apply_along(composed, x, 1), expected, rtol=1e-14, atol=1e-14)
    # Composition is not commutative; the order is the one the docstring promises.
    swapped = apply_along(second.then(first), x, 1)
    assert not np.allclose(swapped, expected)


def test_then_rejects_channel_mismatch_and_non_affine():
    with pytest.raises(ValueError, match="3-channel map with a 4-channel"):
        ChannelAffine.identity(3).then(ChannelAffine.identity(4))
    with pytest.raises(TypeError):
        ChannelAffine.identity(3).then((np.ones(3), np.zeros(3)))


def test_slice_matches_the_channels_of_a_concat():
    rng = np.random.default_rng(RNG_SEED + 1)
    affine = random_affine(rng, 7)
    left, right = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 4))
    whole = apply_along(affine, np.concatenate([left, right], axis=1), 1)
    np.testing.assert_array_equal(apply_along(affine.slice(0, 3), left, 1), whole[:, :3])
    np.testing.assert_array_equal(apply_along(affine.slice(3, 7), right, 1), whole[:, 3:])
    assert affine.slice(3, 7).channels == 4


@pytest.mark.parametrize("start, stop", [(-1, 2), (2, 2), (3, 1), (0, 8)])
def test_slice_rejects_empty_or_out_of_range(start, stop):
    with pytest.raises(ValueError, match="slice"):
        ChannelAffine.identity(7).slice(start, stop)


# ---------------------------------------------------------------- BatchNormalization


def batch_norm_reference(x, scale, bias, mean, var, epsilon):
    """ONNX BatchNormalization (inference) along axis 1, in float64."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    s, b, m, v = (np.asarray(p, dtype=np.float64).reshape(shape) for p in (scale, bias, mean, var))
    return s * (x - m) / np.sqrt(v + epsilon) + b


@pytest.mark.parametrize("param_dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16])
@pytest.mark.parametrize("stat_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("epsilon", [1e-5, 1e-3, 0.0])
def test_batch_norm_map_matches_the_onnx_formula(param_dtype, stat_dtype, epsilon):
    rng = np.random.default_rng(RNG_SEED + 2)
    channels = 6
    scale = rng.standard_normal(channels).astype(param_dtype)
    bias = rng.standard_normal(channels).astype(param_dtype)
    mean = rng.standard_normal(channels).astype(stat_dtype)
    var = rng.uniform(0.1, 3.0, channels).astype(stat_dtype)
    originals = [p.copy() for p in (scale, bias, mean, var)]
    affine = affine_from_batch_norm(scale, bias, mean, var, epsilon)
    x = rng.standard_normal((3, channels, 2, 5))
    expected = batch_norm_reference(x, scale, bias, mean, var, epsilon)
    # The parameters' values, exactly as stored, define the map: float64 arithmetic must reproduce them
    # to float64 precision whatever their storage dtype.
    np.testing.assert_allclose(apply_along(affine, x, 1), expected, rtol=1e-13, atol=1e-13)
    for before, after in zip(originals, (scale, bias, mean, var)):
        np.testing.assert_array_equal(before, after)


INFERENCE_BN_CASES = [case for case in backend_node_cases("test_batchnorm") if "training" not in case[0]]


@pytest.mark.parametrize("name, node, inputs, outputs", INFERENCE_BN_CASES, ids=[c[0] for c in INFERENCE_BN_CASES])
def test_batch_norm_map_matches_the_onnx_backend_test_data(name, node, inputs, outputs):
    x, scale, bias, mean, var = inputs
    epsilon = node_attributes(node).get("epsilon", 1e-5)
    affine = affine_from_batch_norm(scale, bias, mean, var, epsilon)
    np.testing.assert_allclose(apply_along(affine, x.astype(np.float64), 1), outputs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_dtype, stat_dtype, tolerance", [
    (np.float32, np.float32, 1e-5), (np.float16, np.float32, 2e-3), (np.float32, np.float16, 1e-5),
    (np.float64, np.float64, 1e-12),
])
def test_batch_norm_map_matches_onnxruntime_batch_norm_15(x_dtype, stat_dtype, tolerance):
    rng = np.random.default_rng(RNG_SEED + 5)
    channels = 5
    x = rng.standard_normal((2, channels, 3, 4)).astype(x_dtype)
    scale = rng.standard_normal(channels).astype(x_dtype)
    bias = rng.standard_normal(channels).astype(x_dtype)
    mean = rng.standard_normal(channels).astype(stat_dtype)
    var = rng.uniform(0.2, 2.0, channels).astype(stat_dtype)
    epsilon = float(np.float32(1e-3))
    model = single_node_model("BatchNormalization", [("x", x)], [("y", 1)], 15, dict(epsilon=epsilon),
                              initializers=[("s", scale), ("b", bias), ("m", mean), ("v", var)])
    model.graph.output[0].type.tensor_type.elem_type = model.graph.input[0].type.tensor_type.elem_type
    (expected,) = run_ort(model, {"x": x}).values()
    affine = affine_from_batch_norm(scale, bias, mean, var, epsilon)
    np.testing.assert_allclose(apply_along(affine, x.astype(np.float64), 1), expected.astype(np.float64),
                               rtol=tolerance, atol=tolerance)


def test_batch_norm_map_from_lists_and_scalar_epsilon_types():
    affine = affine_from_batch_norm([2.0], [1.0], [3.0], [3.0], np.float32(1.0))
    np.testing.assert_allclose(affine.scale, [1.0], rtol=0, atol=0)
    np.testing.assert_allclose(affine.shift, [-2.0], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=np.ones((2, 1))), "scale must be a non-empty 1-D"),
    (dict(mean=np.zeros(3)), "mean must have 2 values"),
    (dict(var=np.ones(1)), "var must have 2 values"),
    (dict(bias=np.zeros(2, dtype=np.int64)), "bias must be a float array"),
    (dict(var=np.array([1.0, -1.0])), "positive"),
    (dict(var=np.array([1.0, 0.0]), epsilon=0.0), "positive"),
    (dict(scale=np.array([1.0, np.inf])), "not finite"),
    (dict(mean=np.array([np.nan, 0.0])), "not finite"),
])
def test_batch_norm_map_rejects(kwargs, message):
    args = dict(scale=np.ones(2), bias=np.zeros(2), mean=np.zeros(2), var=np.ones(2), epsilon=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        affine_from_batch_norm(**args)


# ---------------------------------------------------------------- Mul / Add / Sub / Div by a constant


def elementwise_reference(op_type, x, constant, constant_is_first):
    operands = (constant.astype(np.float64), x) if constant_is_first else (x, constant.astype(np.float64))
    return {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op_type](*operands)


PER_CHANNEL_CASES = [
    # (output shape, channel axis, constant shape)
    ((2, 4, 3, 5), 1, (4, 1, 1)),
    ((2, 4, 3, 5), 1, (1, 4, 1, 1)),
    ((2, 4, 3, 5), 1, ()),
    ((2, 4, 3, 5), 1, (1,)),
    ((2, 4, 3, 5), 1, (1, 1, 1, 1)),
    ((2, 4, 3, 5), -3, (4, 1, 1)),
    ((2, 4, 6), 1, (4, 1)),
    ((2, 4), 1, (4,)),
    ((2, 4), 1, (1, 4)),
    ((2, 4), -1, (4,)),
    ((2, 3, 4), 2, (4,)),
    ((5, 4), 1, (1, 1)),
    ((1, 4, 3, 5), 1, (1, 4, 1, 1)),
    ((2, 1, 3, 5), 1, (1, 1, 1)),
    ((4,), 0, (4,)),
]


@pytest.mark.parametrize("output_shape, channel_axis, constant_shape", PER_CHANNEL_CASES)
@pytest.mark.parametrize("op_type, constant_is_first", [
    ("Mul", False), ("Mul", True), ("Add", False), ("Add", True),
    ("Sub", False), ("Sub", True), ("Div", False),
])
def test_per_channel_constant_gives_the_ops_map(output_shape, channel_axis, constant_shape, op_type,
                                                 constant_is_first):
    rng = np.random.default_rng(RNG_SEED + 3)
    constant = rng.uniform(0.5, 2.0, constant_shape).astype(np.float32)
    original = constant.copy()
    x = rng.standard_normal(output_shape)
    channels = output_shape[channel_axis]
    affine = affine_from_elementwise(op_type, constant, constant_is_first, channel_axis, len(output_shape),
                                     channels)
    assert affine is not None and affine.channels == channels
    expected = elementwise_reference(op_type, x, constant, constant_is_first)
    assert expected.shape == x.shape
    np.testing.assert_allclose(apply_along(affine, x, channel_axis % x.ndim), expected, rtol=1e-14,
                               atol=1e-14)
    np.testing.assert_array_equal(constant, original)


NOT_PER_CHANNEL_CASES = [
    # (C,) on NCHW lines up with W, not C: broadcasting varies it along the last axis.
    ((2, 4, 4, 4), 1, (4,)),
    ((2, 4, 3, 4), 1, (4,)),
    # Varies along a spatial axis.
    ((2, 4, 3, 5), 1, (1, 1, 3, 1)),
    ((2, 4, 3, 5), 1, (4, 3, 1)),
    ((2, 4, 3, 5), 1, (1, 1, 1, 5)),
    # Varies along the batch axis.
    ((2, 4, 3, 5), 1, (2, 1, 1, 1)),
    # Higher rank than the output: the result would have another shape.
    ((2, 4, 3, 5), 1, (1, 1, 4, 1, 1)),
    ((2, 4), 1, (1, 1, 4)),
    # Wrong size along the channel axis (the result would broadcast to another shape, or fail).
    ((2, 4, 3, 5), 1, (3, 1, 1)),
    ((2, 1, 3, 5), 1, (4, 1, 1)),
    # 2-D output with the channel axis first: (N,) is along axis 1.
    ((4, 4), 0, (4,)),
]


@pytest.mark.parametrize("output_shape, channel_axis, constant_shape", NOT_PER_CHANNEL_CASES)
@pytest.mark.parametrize("op_type", ["Mul", "Add", "Sub", "Div"])
def test_constant_that_is_not_per_channel_gives_none(output_shape, channel_axis, constant_shape, op_type):
    rng = np.random.default_rng(RNG_SEED + 4)
    constant = rng.uniform(0.5, 2.0, constant_shape)
    x = rng.standard_normal(output_shape)
    try:
        expected = elementwise_reference(op_type, x, constant, False)
    except ValueError:
        expected = None
    channels = output_shape[channel_axis]
    # The reference confirms each case is a trap: the result is not a per-channel map of x.
    if expected is not None and expected.shape == x.shape:
        per_channel = np.moveaxis(expected - x if op_type in ("Add", "Sub") else expected / x,
                                  channel_axis, 0).reshape(channels, -1)
        assert not np.allclose(per_channel, per_channel[:, :1])
    assert affine_from_elementwise(op_type, constant, False, channel_axis, len(output_shape), channels) is None


def test_constant_varying_along_the_channel_axis_of_a_square_output_is_per_channel_only_there():
    # On a (N, C) output with N == C, (C,) is per-channel only when the channel axis is the last one.
    constant = np.arange(1.0, 5.0)
    assert affine_from_elementwise("Mul", constant, False, 1, 2, 4) is not None
    assert affine_from_elementwise("Mul", constant, False, 0, 2, 4) is None


def test_uniform_constant_is_the_same_map_for_every_channel():
    affine = affine_from_elementwise("Sub", np.array(2.5), True, 1, 4, 3)
    np.testing.assert_array_equal(affine.scale, [-1.0] * 3)
    np.testing.assert_array_equal(affine.shift, [2.5] * 3)


@pytest.mark.parametrize("constant", [np.array([1.0, 0.0, 2.0]).reshape(3, 1, 1), np.array(0.0),
                                      np.array([1.0, -0.0, 2.0]).reshape(3, 1, 1),
                                      np.array([1e-320, 1.0, 1.0]).reshape(3, 1, 1)])
def test_division_by_zero_or_by_a_value_whose_reciprocal_overflows_gives_none(constant):
    assert affine_from_elementwise("Div", constant, False, 1, 4, 3) is None


def test_constant_divided_by_x_is_not_affine():
    assert affine_from_elementwise("Div", np.full((3, 1, 1), 2.0), True, 1, 4, 3) is None


@pytest.mark.parametrize("constant", [np.array([1.0, np.inf, 2.0]).reshape(3, 1, 1),
                                      np.array(np.nan), np.arange(3, dtype=np.int64).reshape(3, 1, 1)])
def test_non_finite_or_non_float_constant_gives_none(constant):
    assert affine_from_elementwise("Mul", constant, False, 1, 4, 3) is None


def test_float16_and_bfloat16_constants_keep_their_exact_values():
    for dtype in (np.float16, ml_dtypes.bfloat16):
        constant = np.array([0.1, 3.3, -7.7], dtype=dtype).reshape(3, 1, 1)
        affine = affine_from_elementwise("Add", constant, False, 1, 4, 3)
        np.testing.assert_array_equal(affine.shift, constant.astype(np.float64).ravel())


@pytest.mark.parametrize("args, message", [
    (("Pow", np.ones(1), False, 1, 4, 3), "op_type"),
    (("Mul", np.ones(1), False, 4, 4, 3), "channel_axis"),
    (("Mul", np.ones(1), False, -5, 4, 3), "channel_axis"),
    (("Mul", np.ones(1), False, 0, 0, 3), "output_rank"),
    (("Mul", np.ones(1), False, 1, 4, 0), "channels"),
])
def test_elementwise_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        affine_from_elementwise(*args)
