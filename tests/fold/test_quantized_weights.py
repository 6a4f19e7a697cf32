"""The integer arithmetic of folding a per-channel map into a quantized weight, against float64 NumPy."""
import numpy as np
import pytest
from onnx import TensorProto

from foldnorm.fold.quantized.weights import QuantizedWeight, requantize_bias, rescale

RANGES = {np.int8: (TensorProto.INT8, -128, 127), np.uint8: (TensorProto.UINT8, 0, 255),
          np.int16: (TensorProto.INT16, -32768, 32767)}


def dequantize(integers, scale, zero_point, axis):
    shape = [1] * integers.ndim
    if np.size(scale) > 1:
        shape[axis] = -1
    zp = 0.0 if zero_point is None else np.asarray(zero_point, np.float64).reshape(shape)
    return (integers.astype(np.float64) - zp) * np.asarray(scale, np.float64).reshape(shape)


def conv_weight(rng, dtype, zero_point, channels=5, low=None, high=None):
    elem, lo, hi = RANGES[dtype]
    integers = rng.integers(lo if low is None else low, (hi if high is None else high) + 1,
                            size=(channels, 3, 2, 2)).astype(dtype)
    scale = rng.uniform(0.001, 0.1, channels).astype(np.float32)
    zp = np.full(channels, zero_point, dtype)
    return QuantizedWeight(integers, scale, zp, 0, elem)


@pytest.mark.parametrize("dtype,zero_point", [(np.int8, 0), (np.uint8, 128), (np.uint8, 90), (np.int16, 0)])
def test_rescale_matches_the_float64_reference(dtype, zero_point):
    rng = np.random.default_rng(0)
    weight = conv_weight(rng, dtype, zero_point)
    factors = rng.uniform(0.3, 3.0, 5) * np.array([1, -1, 1, -1, -1])
    result = rescale(weight, factors, 0, np.arange(5).reshape(5, 1, 1, 1), per_axis=True, max_steps=1.0)
    got = dequantize(result.integers, result.scale, result.zero_point, 0)
    expected = dequantize(weight.integers, weight.scale, weight.zero_point, 0) * factors.reshape(5, 1, 1, 1)
    _, lo, hi = RANGES[dtype]
    exact_step = weight.scale.astype(np.float64) * np.abs(factors)
    for c in range(5):
        bound = (result.steps.get(c, 0.0) + 1e-6) * exact_step[c]
        assert np.abs(got[c] - expected[c]).max() <= bound + 1e-6 * np.abs(expected[c]).max()
    flipped = 2 * zero_point - weight.integers.astype(np.int64)
    fits = [(flipped[c].min() >= lo and flipped[c].max() <= hi) for c in range(5)]
    assert result.negated == [c for c in (1, 3, 4) if fits[c]]
    assert result.requantized == [c for c in (1, 3, 4) if not fits[c]]
    assert result.integers.dtype == dtype and result.zero_point.dtype == dtype


def test_per_tensor_becomes_per_channel_and_stays_per_tensor_only_for_one_magnitude():
    rng = np.random.default_rng(1)
    integers = rng.integers(-127, 128, size=(4, 6)).astype(np.int8)
    weight = QuantizedWeight(integers, np.float32(0.05), np.int8(0), None, TensorProto.INT8)
    factors = np.array([0.5, -2.0, 1.0, 3.0])
    result = rescale(weight, factors, 0, np.arange(4)[:, None], per_axis=True)
    assert result.scale.shape == (4,) and result.axis == 0
    np.testing.assert_allclose(result.scale, 0.05 * np.abs(factors), rtol=1e-7)
    np.testing.assert_array_equal(result.integers[1], -integers[1])
    with pytest.raises(ValueError, match="more than 1 steps|more than 1"):
        rescale(weight, factors, 0, np.arange(4)[:, None], per_axis=False)
    same = np.array([1.5, -1.5, 1.5, -1.5])
    result = rescale(weight, same, 0, np.arange(4)[:, None], per_axis=False)
    assert result.axis is None and result.scale.shape == () and result.negated == [1, 3]


def test_minus_128_negated_is_requantized_within_half_a_step_and_zero_map_zeroes():
    integers = np.array([[-128, 5, 127], [-128, 0, 3], [7, -7, 1]], dtype=np.int8)
    weight = QuantizedWeight(integers, np.array([0.1, 0.2, 0.3], np.float32), None, 0, TensorProto.INT8)
    result = rescale(weight, np.array([-1.0, 2.0, 0.0]), 0, np.arange(3)[:, None], per_axis=True)
    assert result.requantized == [0] and result.zeroed == [2] and result.negated == []
    np.testing.assert_array_equal(result.integers[1], integers[1])
    np.testing.assert_array_equal(result.integers[2], [0, 0, 0])
    target = -integers[0].astype(np.float64) * 0.1
    got = result.integers[0].astype(np.float64) * float(result.scale[0])
    assert np.abs(got - target).max() <= 0.5 * float(result.scale[0]) * (1 + 1e-6)
    assert 0.0 < result.steps[0] <= 0.5 * 128 / 127 + 1e-6


def test_refusals_name_the_reason():
    integers = np.ones((2, 2), np.int8)
    weight = QuantizedWeight(integers, np.array([np.nan, 1.0], np.float32), None, 0, TensorProto.INT8)
    with pytest.raises(ValueError, match="slot 0 is nan"):
        rescale(weight, np.ones(2), 0, np.arange(2)[:, None], per_axis=True)
    weight = QuantizedWeight(integers, np.array([1.0, 1.0], np.float32), None, 1, TensorProto.INT8)
    with pytest.raises(ValueError, match="along axis 1, not along its output channels"):
        rescale(weight, np.ones(2), 0, np.arange(2)[:, None], per_axis=True)
    weight = QuantizedWeight(integers, np.array([3e38, 1.0], np.float32), None, 0, TensorProto.INT8)
    with pytest.raises(ValueError, match="outside float32's range"):
        rescale(weight, np.array([10.0, 1.0]), 0, np.arange(2)[:, None], per_axis=True)


def test_requantize_bias_rounds_to_input_times_weight_scale():
    values = np.array([0.3, -1.7, 0.0, 12.5])
    scales = np.array([0.01, 0.02, 0.0, 0.003], np.float32)
    integers, bias_scales, steps = requantize_bias(values, 0.05, scales)
    expected_scales = (np.float32(0.05) * scales).astype(np.float32)
    np.testing.assert_array_equal(bias_scales, expected_scales)
    safe = np.where(expected_scales == 0, 1, expected_scales).astype(np.float64)
    np.testing.assert_array_equal(integers, np.rint(values / safe).astype(np.int32))
    assert steps == pytest.approx(np.max(np.abs(integers * safe - values) / safe))
    with pytest.raises(ValueError, match="zero but its bias is not"):
        requantize_bias(np.array([1.0]), 0.05, np.array([0.0], np.float32))
    with pytest.raises(ValueError, match="does not fit int32"):
        requantize_bias(np.array([1e12]), 1e-3, np.array([1e-3], np.float32))
