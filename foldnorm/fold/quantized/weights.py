"""The integer side of folding a per-channel map into a quantized weight: DequantizeLinear's scales and
integers rescaled channel by channel, exactly where the integers allow it.

A weight w = (q - zp) * s (DequantizeLinear) times the map's scale a[c] on output channel c equals
(q' - zp) * s' with

    s' = s * |a[c]|,   q' = q             where a[c] > 0,
                       q' = 2 * zp - q    where a[c] < 0 (the integers negated around the zero point),
                       q' = zp            where a[c] == 0 (the channel becomes zero; s' = s),

which is exact up to the float32 rounding of s' (the same rounding a float fold has). Where that is not
possible the channel's scale slot is requantized from its target values (q - zp) * s * a[c]: a new scale
just large enough for every target to fit, integers rounded to it. How far that moves a weight is measured
in steps of the channel's exact scale s * |a[c]|; a requantization that moves some weight by more than
`max_steps` such steps is refused (the caller falls back). Cases that requantize:
- negation out of range: int8 -128 with zp 0 (128 does not fit), or 2 * zp - q outside the type's range
  for an asymmetric zero point;
- one scale shared by output channels whose |a| differ: a grouped ConvTranspose quantized along axis 1
  (column j of every group shares scale j), or a per-tensor scale before opset 13, where DequantizeLinear
  has no axis and so no per-channel scales at all.
A zero scale stays zero (the channel is zero before and after); a non-finite scale, or an s' that overflows
or underflows float32, is refused.

Everything here is NumPy; there is no graph code.
"""
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

INTEGER_RANGES = {
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT8: (0, 255),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT16: (0, 65535),
}
INT32_RANGE = (-(2 ** 31), 2 ** 31 - 1)
EXACT_STEPS = 1e-3  # a channel whose weights moved by less than this many steps counts as exact
SAME_MAGNITUDE = 2.0 ** -20  # |a| of channels sharing a scale that differ by less (relative) count as equal:
# a float32 BN gives equal magnitudes only up to its own rounding, and s' is rounded to float32 anyway


@dataclass
class QuantizedWeight:
    """A DequantizeLinear of constants: integers, scale (a scalar, or 1-D along `axis`), zero point (None
    when omitted, else shaped like the scale) and the integers' ONNX element type."""

    integers: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    elem_type: int

    def dequantized(self):
        """The float64 weight (q - zp) * s."""
        q = self.integers.astype(np.float64)
        return (q - _along(self.zero_point, self.axis, q.ndim, 0.0)) * _along(self.scale, self.axis, q.ndim, 1.0)


@dataclass
class RescaledWeight:
    """The weight with the map folded in: per-axis along `axis` (or per-tensor when axis is None).

    negated / requantized / zeroed: the output channels whose integers were negated, requantized or set to
    the zero point; steps: {channel: largest change of a requantized channel's weights, in steps of its
    exact scale}.
    """

    integers: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    negated: list = field(default_factory=list)
    requantized: list = field(default_factory=list)
    zeroed: list = field(default_factory=list)
    steps: dict = field(default_factory=dict)

    @property
    def max_steps(self):
        return max(self.steps.values(), default=0.0)


def _along(values, axis, ndim, default):
    if values is None:
        return default
    values = np.asarray(values, dtype=np.float64)
    if axis is None or values.ndim == 0:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def _per_slot(values, weight, out_axis, slots):
    """The scale or zero point of each of the `slots` along out_axis, as float64 (slots,)."""
    if values is None:
        return np.zeros(slots)
    values = np.asarray(values, dtype=np.float64)
    if weight.axis is None:
        return np.full(slots, float(values.reshape(-1)[0]))
    if weight.axis != out_axis:
        raise ValueError("it is quantized along axis %d, not along its output channels (axis %d)"
                         % (weight.axis, out_axis))
    return values.reshape(-1)


def rescale(weight, factors, out_axis, channel_of, *, per_axis, max_steps=1.0):
    """Fold the per-channel factors into a quantized weight; see the module docstring.

    Parameters
    ----------
    weight : QuantizedWeight
    factors : (C,) float64
        The map's scale per output channel.
    out_axis : int
        The weight axis the new scales run along (the DequantizeLinear axis of the result).
    channel_of : int array broadcastable to the weight, moved so out_axis is first
        The output channel of every element (np.moveaxis(weight, out_axis, 0) layout).
    per_axis : bool
        Whether the result may have one scale per slot along out_axis (DequantizeLinear opset 13+).
    max_steps : float
        The largest change a requantized channel may have, in steps of its exact scale.

    Returns
    -------
    RescaledWeight

    Raises
    ------
    ValueError
        The fold cannot be done within `max_steps`, with the reason.
    """
    if weight.elem_type not in INTEGER_RANGES:
        raise ValueError("its integers have a type other than int8, uint8, int16 or uint16")
    low, high = INTEGER_RANGES[weight.elem_type]
    factors = np.asarray(factors, dtype=np.float64)
    q = np.moveaxis(weight.integers.astype(np.int64), out_axis, 0)
    channel_of = np.broadcast_to(channel_of, q.shape)
    if not per_axis:  # one slot: the whole tensor
        if weight.axis is not None:
            raise ValueError("it has per-axis scales before opset 13")
        q, channel_of = q.reshape(1, -1), channel_of.reshape(1, -1)
    slots = q.shape[0]
    scales = _per_slot(weight.scale, weight, out_axis, slots)
    zero_points = _per_slot(weight.zero_point, weight, out_axis, slots).astype(np.int64)
    new_q = np.empty_like(q)
    new_scales = np.empty(slots, dtype=np.float32)
    result = RescaledWeight(integers=None, scale=None, zero_point=None, axis=out_axis if per_axis else None)
    for k in range(slots):
        s, zp = scales[k], int(zero_points[k])
        if not np.isfinite(s):
            raise ValueError("the scale of its weight slot %d is %r" % (k, float(s)))
        a = factors[channel_of[k]]
        if s == 0.0 or not np.any(a):  # the slot is zero before and after
            new_q[k] = np.where(a == 0.0, zp, q[k])
            new_scales[k] = s
            result.zeroed.extend(sorted({int(c) for c in channel_of[k][a == 0.0].reshape(-1)}))
            continue
        new_q[k], new_scales[k] = _rescale_slot(q[k], s, zp, a, channel_of[k], low, high, max_steps, result)
    if per_axis:
        result.integers = np.moveaxis(new_q, 0, out_axis).astype(weight.integers.dtype)
        result.scale = new_scales
        result.zero_point = None if weight.zero_point is None else zero_points.astype(weight.zero_point.dtype)
    else:
        shape = np.moveaxis(weight.integers, out_axis, 0).shape
        result.integers = np.moveaxis(new_q.reshape(shape), 0, out_axis).astype(weight.integers.dtype)
        result.scale = np.asarray(new_scales[0], dtype=np.float32).reshape(np.shape(weight.scale))
        result.zero_point = weight.zero_point
    for name in ("negated", "requantized", "zeroed"):
        setattr(result, name, sorted(set(getattr(result, name))))
    return result


def _rescale_slot(q, s, zp, a, channels, low, high, max_steps, result):
    """(integers, float32 scale) of one scale slot; records negated/requantized channels in `result`."""
    magnitudes = np.abs(a)
    nonzero = magnitudes[magnitudes > 0.0]
    if nonzero.max() - nonzero.min() <= SAME_MAGNITUDE * nonzero.max():
        with np.errstate(over="ignore"):
            scale = np.float32(s * nonzero.max())
        if not np.isfinite(scale) or scale == 0.0:
            raise ValueError("its rescaled weight scale %r * %r is outside float32's range" % (float(s), nonzero[0]))
        flipped = 2 * zp - q
        candidate = np.where(a > 0.0, q, np.where(a < 0.0, flipped, zp))
        if candidate.min() >= low and candidate.max() <= high:
            result.negated.extend(int(c) for c in np.unique(channels[a < 0.0]))
            result.zeroed.extend(int(c) for c in np.unique(channels[a == 0.0]))
            return candidate, scale
    target = (q - zp) * s * a
    exact_steps = s * magnitudes
    scale = float(np.max(exact_steps))
    if target.max() > 0.0:
        scale = max(scale, target.max() / (high - zp)) if high > zp else np.inf
    if target.min() < 0.0:
        scale = max(scale, target.min() / (low - zp)) if low < zp else np.inf
    with np.errstate(over="ignore"):
        scale32 = np.float32(scale)
    if not np.isfinite(scale32) or scale32 == 0.0:
        raise ValueError("its weights do not fit the integer range around zero point %d at any float32 scale" % zp)
    if float(scale32) < scale:
        scale32 = np.nextafter(scale32, np.float32(np.inf))
    integers = np.clip(np.rint(target / float(scale32)) + zp, low, high).astype(np.int64)
    moved = np.abs((integers - zp) * float(scale32) - target)
    with np.errstate(invalid="ignore", divide="ignore"):
        steps = np.where(magnitudes > 0.0, moved / np.where(exact_steps > 0.0, exact_steps, 1.0), 0.0)
    for channel in np.unique(channels):
        worst = float(steps[channels == channel].max())
        if worst > max_steps:
            raise ValueError("output channel %d cannot keep exact integers (%s), and requantizing it would move "
                             "a weight by %.2f steps of its scale (more than %g)"
                             % (channel, _why_requantized(a, channels, channel, zp, low, high), worst, max_steps))
        if worst > EXACT_STEPS:
            result.requantized.append(int(channel))
            result.steps[int(channel)] = max(worst, result.steps.get(int(channel), 0.0))
        elif a[channels == channel].reshape(-1)[0] < 0.0:
            result.negated.append(int(channel))
        elif a[channels == channel].reshape(-1)[0] == 0.0:
            result.zeroed.append(int(channel))
    return integers, scale32


def _why_requantized(a, channels, channel, zp, low, high):
    shared = np.abs(a[a != 0.0])
    if shared.max() - shared.min() > SAME_MAGNITUDE * shared.max():
        return "it shares one weight scale with channels whose |scale| in the map differs"
    return "negating its integers around zero point %d leaves the range [%d, %d]" % (zp, low, high)


def requantize_bias(values, input_scale, weight_scales):
    """An int32 bias for DequantizeLinear(scale = input scale x weight scale), as onnxruntime's integer
    Conv/Gemm assume it.

    Returns (int32 (C,), float32 bias scales (C,), largest rounding in steps of the bias scale).
    Raises ValueError when a channel's bias scale is zero (a nonzero bias cannot be written) or a value
    does not fit int32.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    scales = (np.float32(input_scale) * np.asarray(weight_scales, dtype=np.float32)).astype(np.float32)
    scales = np.broadcast_to(scales, values.shape)
    zero = scales == 0.0
    if np.any(zero & (values != 0.0)):
        raise ValueError("a channel's bias scale (input scale x weight scale) is zero but its bias is not")
    safe = np.where(zero, 1.0, scales.astype(np.float64))
    integers = np.rint(values / safe)
    if integers.min(initial=0) < INT32_RANGE[0] or integers.max(initial=0) > INT32_RANGE[1]:
        raise ValueError("the folded bias does not fit int32 at scale input scale x weight scale")
    steps = np.abs(integers * safe - values) / safe
    return integers.astype(np.int32), np.array(scales, dtype=np.float32), float(steps.max(initial=0.0))
