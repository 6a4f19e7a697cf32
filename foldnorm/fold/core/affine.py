"""The per-channel affine map that every foldable normalization reduces to.

BatchNormalization in inference mode, and a Mul / Add / Sub / Div by a constant that varies only along the
channel axis, are all the same map

    y[..., c, ...] = scale[c] * x[..., c, ...] + shift[c]

along one channel axis. The fold pass turns each such node into a `ChannelAffine` first (this module),
then lets a neighbouring layer absorb it (foldnorm.absorb). Everything here is plain NumPy in float64;
there is no graph code.
"""
from dataclasses import dataclass

import numpy as np

ELEMENTWISE_OPS = ("Mul", "Add", "Sub", "Div")


def is_float_dtype(dtype):
    """True for the float dtypes a model tensor can arrive in (float16/32/64, and ml_dtypes' bfloat16)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name == "bfloat16"


def as_float64(values, name):
    """A float64 copy of a float array; ValueError naming `name` for anything else."""
    if not isinstance(values, np.ndarray):
        values = np.asarray(values)
    if not is_float_dtype(values.dtype):
        raise ValueError("%s must be a float array, got dtype %s" % (name, values.dtype))
    return np.array(values, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class ChannelAffine:
    """y = scale[c] * x + shift[c] along a channel axis; float64 arrays of shape (C,).

    The constructor copies `scale` and `shift` to read-only float64 arrays, so an instance never changes
    and never aliases its caller's data. Both must be 1-D, of equal non-zero length and finite: a map
    with an infinite or NaN coefficient cannot be folded into weights exactly.
    """

    scale: np.ndarray
    shift: np.ndarray

    def __post_init__(self):
        scale = np.array(self.scale, dtype=np.float64)
        shift = np.array(self.shift, dtype=np.float64)
        if scale.ndim != 1 or scale.size == 0:
            raise ValueError("scale must be a non-empty 1-D array, got shape %s" % (scale.shape,))
        if shift.shape != scale.shape:
            raise ValueError("shift must have the shape of scale %s, got %s" % (scale.shape, shift.shape))
        if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
            raise ValueError("scale and shift must be finite")
        scale.setflags(write=False)
        shift.setflags(write=False)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "shift", shift)

    @classmethod
    def identity(cls, channels):
        """The map y = x over `channels` channels."""
        return cls(np.ones(channels), np.zeros(channels))

    @property
    def channels(self):
        return self.scale.shape[0]

    def then(self, other):
        """The map `other` applied after `self`: other(self(x)).

        other.scale * (self.scale * x + self.shift) + other.shift
            = (other.scale * self.scale) * x + (other.scale * self.shift + other.shift).
        """
        if not isinstance(other, ChannelAffine):
            raise TypeError("other must be a ChannelAffine, got %s" % type(other).__name__)
        if other.channels != self.channels:
            raise ValueError("cannot compose a %d-channel map with a %d-channel map"
                             % (self.channels, other.channels))
        return ChannelAffine(other.scale * self.scale, other.scale * self.shift + other.shift)

    def slice(self, start, stop):
        """The map restricted to channels [start, stop), e.g. one input of a Concat along the channels."""
        start, stop = int(start), int(stop)
        if not 0 <= start < stop <= self.channels:
            raise ValueError("channel slice [%d, %d) is not a non-empty part of [0, %d)"
                             % (start, stop, self.channels))
        return ChannelAffine(self.scale[start:stop], self.shift[start:stop])


def affine_from_batch_norm(scale, bias, mean, var, epsilon):
    """The affine map of an inference-mode BatchNormalization.

    ONNX: y = scale * (x - mean) / sqrt(var + epsilon) + bias, i.e.

        a = scale / sqrt(var + epsilon)
        b = bias - mean * a

    computed in float64 whatever the parameters' float dtypes (BN-15 allows scale/bias and mean/var to
    differ). The parameters must be 1-D float arrays of equal length. Raises ValueError otherwise, and
    when var + epsilon is not positive or the map is not finite: such a BN produces inf/NaN that no folded
    weight reproduces, so it must stay.
    """
    params = {}
    for name, values in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)):
        params[name] = as_float64(values, name)
        if params[name].ndim != 1 or params[name].size == 0:
            raise ValueError("%s must be a non-empty 1-D array, got shape %s" % (name, params[name].shape))
    channels = params["scale"].shape[0]
    for name, values in params.items():
        if values.shape[0] != channels:
            raise ValueError("%s must have %d values like scale, got %d" % (name, channels, values.shape[0]))
    epsilon = float(epsilon)
    denominator = params["var"] + epsilon
    if not (denominator > 0.0).all():
        raise ValueError("var + epsilon must be positive for every channel")
    with np.errstate(all="ignore"):
        a = params["scale"] / np.sqrt(denominator)
        b = params["bias"] - params["mean"] * a
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("the BatchNormalization map is not finite (infinite or NaN parameters)")
    return ChannelAffine(a, b)


def per_channel_values(constant, channel_axis, output_rank, channels):
    """The constant's value for each channel, shape (channels,) float64, or None when it is not per-channel.

    Under NumPy/ONNX multidirectional broadcasting the constant's shape is aligned to the output's LAST
    axes. It is per-channel when, after padding its shape with leading 1s to `output_rank`, every axis but
    `channel_axis` has size 1 and `channel_axis` has size 1 or `channels`, and its rank does not exceed the
    output's (a higher rank would change the output's shape). A (C,) constant therefore lines up with the
    last axis, which is the channel axis only when channel_axis == output_rank - 1.
    """
    output_rank = int(output_rank)
    channels = int(channels)
    if output_rank < 1:
        raise ValueError("output_rank must be at least 1, got %d" % output_rank)
    if channels < 1:
        raise ValueError("channels must be at least 1, got %d" % channels)
    channel_axis = int(channel_axis)
    if not -output_rank <= channel_axis < output_rank:
        raise ValueError("channel_axis=%d is out of range for rank %d" % (channel_axis, output_rank))
    channel_axis %= output_rank
    if not isinstance(constant, np.ndarray):
        constant = np.asarray(constant)
    if constant.ndim > output_rank:
        return None
    shape = (1,) * (output_rank - constant.ndim) + constant.shape
    for axis, size in enumerate(shape):
        if axis == channel_axis:
            if size not in (1, channels):
                return None
        elif size != 1:
            return None
    return np.broadcast_to(np.asarray(constant, dtype=np.float64).reshape(-1), (channels,)).copy()


def affine_from_elementwise(op_type, constant, constant_is_first, channel_axis, output_rank, channels):
    """The affine map of a Mul / Add / Sub / Div with one constant operand c, or None when it is not one.

        Mul:  x * c, c * x  ->  (c, 0)
        Add:  x + c, c + x  ->  (1, c)
        Sub:  x - c         ->  (1, -c);   c - x  ->  (-1, c)
        Div:  x / c         ->  (1/c, 0), None if any c == 0;   c / x is not affine -> None

    None too when the constant is not per-channel under broadcasting (see per_channel_values), is not a
    float array, or holds an infinite or NaN value. Scalars and size-1 constants are per-channel (the same
    value for every channel). Raises ValueError for an op_type other than the four above.
    """
    if op_type not in ELEMENTWISE_OPS:
        raise ValueError("op_type must be one of %s, got %r" % (", ".join(ELEMENTWISE_OPS), op_type))
    if not isinstance(constant, np.ndarray):
        constant = np.asarray(constant)
    if not is_float_dtype(constant.dtype):
        return None
    values = per_channel_values(constant, channel_axis, output_rank, channels)
    if values is None or not np.isfinite(values).all():
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    if op_type == "Mul":
        return ChannelAffine(values, zeros)
    if op_type == "Add":
        return ChannelAffine(ones, values)
    if op_type == "Sub":
        return ChannelAffine(-ones, values) if constant_is_first else ChannelAffine(ones, -values)
    if constant_is_first or (values == 0.0).any():
        return None
    with np.errstate(over="ignore"):
        reciprocal = 1.0 / values
    if not np.isfinite(reciprocal).all():
        return None
    return ChannelAffine(reciprocal, zeros)
