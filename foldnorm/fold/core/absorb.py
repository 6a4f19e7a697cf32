"""Absorbers: fold a ChannelAffine into the weights of a neighbouring linear layer.

A backward fold takes a map y = a * layer(x) + b on the layer's OUTPUT channels into its weights and
bias; a forward fold takes a map on the layer's INPUT channels, layer(a * x + b). Each function is pure:
it never modifies its arguments, computes in float64, and returns new arrays cast back to the dtype of the
tensor they replace (a bias that did not exist is created in the weight's dtype). A fold that cannot be
done exactly raises ValueError, naming the argument or the reason, so the caller can leave the node
as it is. The caller decides whether a fold is allowed by the graph (single consumer, zero padding, ...).

Notation: a = affine.scale, b = affine.shift, both (C,) float64.
"""
import numpy as np

from .affine import ChannelAffine, as_float64, is_float_dtype


def _check_affine(affine, channels, what):
    if not isinstance(affine, ChannelAffine):
        raise TypeError("affine must be a ChannelAffine, got %s" % type(affine).__name__)
    if affine.channels != channels:
        raise ValueError("affine has %d channels but the %s has %d" % (affine.channels, what, channels))


def _check_group(group, channels, name):
    if isinstance(group, bool) or int(group) != group or group < 1:
        raise ValueError("group must be a positive int, got %r" % (group,))
    group = int(group)
    if channels % group:
        raise ValueError("%s=%d is not divisible by group=%d" % (name, channels, group))
    return group


def _weight(weight, name, ndim=None, min_ndim=None):
    """(float64 copy of the weight, its dtype)."""
    values = as_float64(weight, name)
    if ndim is not None and values.ndim != ndim:
        raise ValueError("%s must be %d-D, got shape %s" % (name, ndim, values.shape))
    if min_ndim is not None and values.ndim < min_ndim:
        raise ValueError("%s must have at least %d dims, got shape %s" % (name, min_ndim, values.shape))
    return values, np.asarray(weight).dtype


def _channel_bias(bias, channels, name="bias"):
    """(float64 copy of a (C,) bias, or None)."""
    if bias is None:
        return None
    values = as_float64(bias, name)
    if values.shape != (channels,):
        raise ValueError("%s must have shape (%d,), got %s" % (name, channels, values.shape))
    return values


def _row_bias(bias, channels, name):
    """(float64 copy of a bias that broadcasts along the last axis of a 2-D output, or None).

    Allowed: a scalar, or rank 1 or 2 with a last axis of 1 or `channels`.
    """
    if bias is None:
        return None
    values = as_float64(bias, name)
    if values.ndim > 2 or (values.ndim >= 1 and values.shape[-1] not in (1, channels)):
        raise ValueError("%s must be a scalar or have a last axis of 1 or %d and rank <= 2, got shape %s"
                         % (name, channels, values.shape))
    return values


def _cast_back(values, dtype, name, source=None):
    """values (float64) cast to dtype; ValueError when the cast overflows (new infinities)."""
    with np.errstate(over="ignore"):
        result = values.astype(dtype)
    if source is None or np.isfinite(source).all():
        if not np.isfinite(result).all():
            raise ValueError("the folded %s does not fit in %s" % (name, np.dtype(dtype)))
    return result


def _per_axis(values, axis, ndim):
    """values reshaped to broadcast along `axis` of an ndim-D array."""
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)


def _bias_dtype(bias, weight_dtype):
    return np.asarray(bias).dtype if bias is not None else weight_dtype


# ---------------------------------------------------------------- backward: layer -> affine


def fold_into_conv(weight, bias, affine, group):
    """Fold y = a * Conv(x) + b into the Conv.

    weight (C_out, C_in/group, *k), bias (C_out,) or None. Output channel o is weight row o whatever the
    group, so:
        W'[o, ...] = a[o] * W[o, ...]
        bias'[o]   = a[o] * bias[o] + b[o]        (bias' = b when there was no bias)

    The new weight is a ScaledRows, computed from `weight` when it is read (written to a file or turned
    into an array); the new bias an array.
    """
    w = np.asarray(weight)
    if not is_float_dtype(w.dtype):
        raise ValueError("weight must be a float array, got dtype %s" % w.dtype)
    if w.ndim < 3:
        raise ValueError("weight must have at least 3 dims, got shape %s" % (w.shape,))
    channels = w.shape[0]
    _check_group(group, channels, "C_out")
    _check_affine(affine, channels, "Conv's output")
    bias64 = _channel_bias(bias, channels)
    new_bias = affine.shift if bias64 is None else affine.scale * bias64 + affine.shift
    return (_scale_rows(w, affine.scale, "weight"),
            _cast_back(new_bias, _bias_dtype(bias, w.dtype), "bias", bias64))


_ROW_BLOCK_ELEMENTS = 2**18


class ScaledRows:
    """weight[o, ...] * scale[o] computed in float64 and cast back to weight's dtype, as _cast_back does, a
    block of rows at a time each time it is read: a folded Conv weight that goes from its source (often
    mapped from the model's data file) to the output's data file without ever being held whole in memory.

    Array-like: shape, dtype, ndim, size and nbytes as the result's; np.asarray computes it whole; blocks()
    yields it a block of whole rows at a time, in order. The source is not copied and must stay unchanged
    (the fold never modifies an array it reads).
    """

    def __init__(self, weight, scale):
        self.source = weight
        self.scale = np.array(scale, dtype=np.float64)
        self.shape, self.dtype, self.ndim = weight.shape, weight.dtype, weight.ndim
        self.size, self.nbytes = weight.size, weight.nbytes
        self._rows = max(1, _ROW_BLOCK_ELEMENTS // max(1, self.size // max(1, self.shape[0])))

    def blocks(self):
        """The result's consecutive blocks of whole rows, each a new C-contiguous array."""
        with np.errstate(over="ignore"):
            for start in range(0, self.shape[0], self._rows):
                rows = self.source[start:start + self._rows]
                block = np.empty(rows.shape, self.dtype)
                # In float64, cast back as each chunk is done: no float64 copy of the block.
                np.multiply(rows, _per_axis(self.scale[start:start + len(rows)], 0, self.ndim), out=block,
                            dtype=np.float64, casting="unsafe")
                yield block

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a ScaledRows is computed when read: it cannot be viewed without a copy")
        result = np.empty(self.shape, self.dtype)
        start = 0
        for block in self.blocks():
            result[start:start + len(block)] = block
            start += len(block)
        return result if dtype is None else result.astype(dtype, copy=False)

    def overflows(self):
        """Whether a value finite in the source is not finite in the result when every source value is
        finite. Exact without computing the result: rounding is monotonic, so the largest magnitude of each
        row decides whether the row's scaled values fit."""
        source_finite = result_finite = True
        if self.size == 0:
            return False
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, self.shape[0], self._rows):
                rows = self.source[start:start + self._rows]
                rows = rows.reshape(len(rows), -1)
                peak = np.maximum(rows.max(axis=1), -rows.min(axis=1)).astype(np.float64)
                source_finite = source_finite and bool(np.isfinite(peak).all())
                scaled = (peak * np.abs(self.scale[start:start + self._rows])).astype(self.dtype)
                result_finite = result_finite and bool(np.isfinite(scaled).all())
        return source_finite and not result_finite


def _scale_rows(weight, scale, name):
    """weight[o, ...] * scale[o] as a ScaledRows, computed when it is read (an array when it is one block or
    less: nothing to save by deferring it); ValueError when it does not fit in weight's dtype."""
    result = ScaledRows(weight, scale)
    if weight.size <= _ROW_BLOCK_ELEMENTS:
        array = np.asarray(result)
        if np.isfinite(weight).all() and not np.isfinite(array).all():
            raise ValueError("the folded %s does not fit in %s" % (name, weight.dtype))
        return array
    if result.overflows():
        raise ValueError("the folded %s does not fit in %s" % (name, weight.dtype))
    return result


def fold_into_conv_transpose(weight, bias, affine, group):
    """Fold y = a * ConvTranspose(x) + b into the ConvTranspose.

    weight (C_in, C_out/group, *k): input channels are split into `group` blocks of C_in/group rows, and
    column j of block g produces output channel g * (C_out/group) + j, so:
        W'[g*(C_in/group) + i, j, ...] = a[g*(C_out/group) + j] * W[g*(C_in/group) + i, j, ...]
        bias' = a * bias + b                      (bias' = b when there was no bias)
    """
    w, w_dtype = _weight(weight, "weight", min_ndim=3)
    group = _check_group(group, w.shape[0], "C_in")
    out_per_group = w.shape[1]
    channels = out_per_group * group
    _check_affine(affine, channels, "ConvTranspose's output")
    bias64 = _channel_bias(bias, channels)
    kernel = w.shape[2:]
    blocks = w.reshape((group, w.shape[0] // group, out_per_group) + kernel)
    scale = affine.scale.reshape((group, 1, out_per_group) + (1,) * len(kernel))
    new_weight = (blocks * scale).reshape(w.shape)
    new_bias = affine.shift if bias64 is None else affine.scale * bias64 + affine.shift
    return (_cast_back(new_weight, w_dtype, "weight", w),
            _cast_back(new_bias, _bias_dtype(bias, w_dtype), "bias", bias64))


def _gemm_b(b, trans_b):
    """(float64 B, its dtype, K, N) for Gemm's B, (K, N), or (N, K) when trans_b."""
    b64, b_dtype = _weight(b, "b", ndim=2)
    k, n = (b64.shape[1], b64.shape[0]) if trans_b else b64.shape
    return b64, b_dtype, k, n


def fold_into_gemm(b, c, affine, alpha, beta, trans_b):
    """Fold Y' = a * Y + b_shift along Y's axis 1 into Gemm Y = alpha * A' @ B' + beta * C.

    B' = B.T when trans_b. Column n of Y is column n of B' (row n of B when trans_b), so:
        B'[:, n] <- a[n] * B'[:, n]
        C'       =  a * beta * C + b_shift        (C' = b_shift when C is None), returned with beta = 1
    C may be a scalar, (1,), (N,), (1, 1), (1, N), (M, 1) or (M, N); C' keeps C's leading axis and has N
    columns: (N,) for None/scalar/1-D C, (1, N) or (M, N) for 2-D C. alpha is unchanged.
    Returns (B', C', 1.0) with B' and C' in the dtypes of B and C (B's when there was no C).
    """
    b64, b_dtype, _, n = _gemm_b(b, trans_b)
    _check_affine(affine, n, "Gemm's output (N)")
    c64 = _row_bias(c, n, "c")
    new_b = b64 * (affine.scale[:, None] if trans_b else affine.scale[None, :])
    new_c = affine.shift if c64 is None else affine.scale * (float(beta) * c64) + affine.shift
    return (_cast_back(new_b, b_dtype, "b", b64),
            _cast_back(new_c, _bias_dtype(c, b_dtype), "c", c64),
            1.0)


def fold_into_matmul(weight, bias, affine):
    """Fold Y' = a * Y + b along Y's last axis into Y = X @ W (+ bias), X and Y 2-D, W constant (K, N).

        W'[:, n] = a[n] * W[:, n]
        bias'    = a * bias + b                   (bias' = b, shape (N,), when there was no bias)
    bias may be a scalar or have rank <= 2 with a last axis of 1 or N (typically (N,) or (1, N)); bias'
    keeps its leading axis and has N columns.
    """
    w, w_dtype = _weight(weight, "weight", ndim=2)
    n = w.shape[1]
    _check_affine(affine, n, "MatMul's output (N)")
    bias64 = _row_bias(bias, n, "bias")
    new_weight = w * affine.scale[None, :]
    new_bias = affine.shift if bias64 is None else affine.scale * bias64 + affine.shift
    return (_cast_back(new_weight, w_dtype, "weight", w),
            _cast_back(new_bias, _bias_dtype(bias, w_dtype), "bias", bias64))


# ---------------------------------------------------------------- forward: affine -> layer


def fold_forward_into_conv(weight, bias, affine, group):
    """Fold Conv(a * x + b) into the Conv; exact only when the Conv pads nothing (the caller checks).

    weight (C_out, C_in/group, *k); output channel o is in group g = o // (C_out/group) and its weight
    column i reads input channel g * (C_in/group) + i =: channel(o, i). Without padding every output
    position sees every tap, so the shift adds a constant per output channel:
        W'[o, i, ...] = W[o, i, ...] * a[channel(o, i)]
        bias'[o]      = bias[o] + sum_{i, k} W[o, i, k] * b[channel(o, i)]
    (bias' is created when there was no bias). Strides and dilations do not matter.
    """
    w, w_dtype = _weight(weight, "weight", min_ndim=3)
    c_out, in_per_group = w.shape[:2]
    group = _check_group(group, c_out, "C_out")
    _check_affine(affine, in_per_group * group, "Conv's input")
    bias64 = _channel_bias(bias, c_out)
    kernel = w.shape[2:]
    blocks = w.reshape((group, c_out // group, in_per_group) + kernel)
    scale = affine.scale.reshape((group, 1, in_per_group) + (1,) * len(kernel))
    new_weight = (blocks * scale).reshape(w.shape)
    shift = affine.shift.reshape(group, 1, in_per_group)
    added = (blocks.reshape(group, c_out // group, in_per_group, -1).sum(axis=3) * shift).sum(axis=2)
    new_bias = added.reshape(c_out) if bias64 is None else bias64 + added.reshape(c_out)
    return (_cast_back(new_weight, w_dtype, "weight", w),
            _cast_back(new_bias, _bias_dtype(bias, w_dtype), "bias", bias64))


def fold_forward_into_conv_transpose(weight, bias, affine, group, *, strides=None):
    """Fold ConvTranspose(a * x + b) into the ConvTranspose, when that is exact.

    weight (C_in, C_out/group, *k); row i reads input channel i, so the scale always folds:
        W'[i, ...] = a[i] * W[i, ...]
    The shift is the hard part: a ConvTranspose scatters each input position over k taps, and output
    positions near the borders (or between strided taps) receive fewer taps than the others, even without
    padding. The constant it adds is the same at every output position, and so foldable into the bias,
    only when
      - the shift contributes nothing: sum_i W[i, j, k] * b[i] == 0 for every output channel j and tap k
        (e.g. b == 0); the bias is then unchanged (zeros when there was none), or
      - every spatial kernel size is 1 and every stride is 1 (pass `strides`; unknown strides are not
        assumed to be 1): then every output position takes exactly one tap and
        bias'[g*(C_out/group) + j] = bias[...] + sum_{i in group g} W[i, j] * b[i].
    Anything else raises ValueError. The caller also guarantees no pads and no output crop/padding.
    """
    w, w_dtype = _weight(weight, "weight", min_ndim=3)
    c_in, out_per_group = w.shape[:2]
    group = _check_group(group, c_in, "C_in")
    c_out = out_per_group * group
    _check_affine(affine, c_in, "ConvTranspose's input")
    bias64 = _channel_bias(bias, c_out)
    kernel = w.shape[2:]
    new_weight = w * _per_axis(affine.scale, 0, w.ndim)
    blocks = w.reshape((group, c_in // group, out_per_group, -1))
    # per_tap[g, j, k] = sum over the group's input channels i of W[i, j, k] * b[i]
    per_tap = (blocks * affine.shift.reshape(group, c_in // group, 1, 1)).sum(axis=1)
    if not per_tap.any():
        new_bias = np.zeros(c_out) if bias64 is None else bias64
    elif all(size == 1 for size in kernel) and strides is not None and all(int(s) == 1 for s in strides):
        added = per_tap.reshape(c_out)
        new_bias = added if bias64 is None else bias64 + added
    else:
        raise ValueError("the input shift of a ConvTranspose reaches border output positions through "
                         "fewer kernel taps, so it cannot be folded into a bias (only a 1x1 kernel with "
                         "stride 1, or a zero shift, folds exactly)")
    return (_cast_back(new_weight, w_dtype, "weight", w),
            _cast_back(new_bias, _bias_dtype(bias, w_dtype), "bias", bias64))


def fold_forward_into_gemm(b, c, affine, alpha, beta, trans_b):
    """Fold Gemm(a * X + b_shift) into Gemm Y = alpha * X @ B' + beta * C (transA == 0; the caller checks).

    The map acts on X's axis 1, the K axis: row k of B' (column k of B when trans_b) reads feature k, so:
        B'[k, :] <- a[k] * B'[k, :]
        C'        = beta * C + alpha * (b_shift @ B')     (C' created when C is None), returned with beta = 1
    C' keeps C's leading axis and has N columns, as in fold_into_gemm.
    """
    b64, b_dtype, k, n = _gemm_b(b, trans_b)
    _check_affine(affine, k, "Gemm's input (K)")
    c64 = _row_bias(c, n, "c")
    b_prime = b64.T if trans_b else b64
    new_b = b64 * (affine.scale[None, :] if trans_b else affine.scale[:, None])
    added = float(alpha) * (affine.shift @ b_prime)
    new_c = added if c64 is None else float(beta) * c64 + added
    return (_cast_back(new_b, b_dtype, "b", b64),
            _cast_back(new_c, _bias_dtype(c, b_dtype), "c", c64),
            1.0)


def fold_forward_into_matmul(weight, bias, affine):
    """Fold MatMul(a * X + b) (+ bias) into Y = X @ W (+ bias), X 2-D with the map on its axis 1 (K).

        W'[k, :] = a[k] * W[k, :]
        bias'    = bias + b @ W                   (bias' = b @ W, shape (N,), when there was no bias)
    bias as in fold_into_matmul.
    """
    w, w_dtype = _weight(weight, "weight", ndim=2)
    k, n = w.shape
    _check_affine(affine, k, "MatMul's input (K)")
    bias64 = _row_bias(bias, n, "bias")
    new_weight = w * affine.scale[:, None]
    added = affine.shift @ w
    new_bias = added if bias64 is None else bias64 + added
    return (_cast_back(new_weight, w_dtype, "weight", w),
            _cast_back(new_bias, _bias_dtype(bias, w_dtype), "bias", bias64))


# ---------------------------------------------------------------- a map that stays


def affine_as_mul_add(affine, rank, channel_axis, dtype):
    """(mul_constant, add_constant) for rewriting the map as Mul then Add on a rank-`rank` tensor.

    Both are shaped (C, 1, ..., 1) with rank - channel_axis axes, so that NumPy/ONNX broadcasting (which
    aligns trailing axes) puts C on `channel_axis`: (C, 1, 1) for NCHW, (C,) for a 2-D (N, C) tensor.
    Returned in `dtype`; ValueError when a value does not fit in it.
    """
    if not isinstance(affine, ChannelAffine):
        raise TypeError("affine must be a ChannelAffine, got %s" % type(affine).__name__)
    rank, channel_axis = int(rank), int(channel_axis)
    if rank < 1:
        raise ValueError("rank must be at least 1, got %d" % rank)
    if not -rank <= channel_axis < rank:
        raise ValueError("channel_axis=%d is out of range for rank %d" % (channel_axis, rank))
    shape = (affine.channels,) + (1,) * (rank - channel_axis % rank - 1)
    return (_cast_back(affine.scale.reshape(shape), dtype, "scale"),
            _cast_back(affine.shift.reshape(shape), dtype, "shift"))
