"""Layer normalization and RMS normalization over the trailing dimensions, forward and backward.

`axis` follows ONNX's LayerNormalization / RMSNormalization: x is normalized over x.shape[axis:], i.e.
viewed as M = prod(x.shape[:axis]) rows of K = prod(x.shape[axis:]) values, each row with its own
statistics; weight and bias have shape x.shape[axis:].

dtypes: float32 and float64; float16 is accepted, computed in float32 and returned as float16.
Statistics (mean, invstd, invrms) come back in the compute dtype (float32 for float16/float32, float64
for float64) with ONNX's shape for them, x.shape[:axis] + (1,) * (x.ndim - axis).  Gradients come back in
x's dtype.  Statistics are sums centred near each row's mean: for float32, in float32 lanes added up in
float64 (an exact float64 two-pass where the lanes would not be accurate); for float64, the exact
two-pass.  Results are bit-identical for any num_threads.

Results of 4 MiB or more are views of memory that is recycled once every view of a result is gone (their
.base is set), which spares a page fault per page on each call; they behave as ordinary arrays.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from . import _layer_norm
from ._outputs import empty_result
from ._validation import as_input, as_like, as_param, check_eps, normalize_axis
from .runtime import resolve_num_threads

__all__ = ["layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward"]


def layer_norm(x: ArrayLike, weight: ArrayLike | None = None, bias: ArrayLike | None = None, *, axis: int = -1,
               eps: float = 1e-5, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer normalization (ONNX LayerNormalization; torch.nn.functional.layer_norm for axis=-1).

    For every row r of x viewed as M x K (K = prod(x.shape[axis:])):

        mean[r]   = sum_k x[r, k] / K
        invstd[r] = 1 / sqrt(sum_k (x[r, k] - mean[r])^2 / K + eps)      (population variance)
        y[r, k]   = (x[r, k] - mean[r]) * invstd[r] * weight[k] + bias[k]

    Args:
        x: float16/32/64 array of any shape with at least one dimension, not empty.
        weight, bias: arrays of shape x.shape[axis:], or None for 1 and 0.
        axis: first normalized dimension, in [-x.ndim, x.ndim).
        eps: finite non-negative real number added to the variance.
        num_threads: threads to use, a positive int; None means foldnorm.get_num_threads().  Capped to
            the usable cores and to one thread per 128 Ki elements (runtime.PARALLEL_GRAIN).

    Returns:
        (y, mean, invstd): y like x (same shape and dtype); mean and invstd of shape
        x.shape[:axis] + (1,) * (x.ndim - axis) in the compute dtype.

    Example:
        >>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> y, mean, invstd = layer_norm(x)
        >>> mean.ravel()
        array([1., 4.], dtype=float32)
        >>> np.round(y, 4)
        array([[-1.2247,  0.    ,  1.2247],
               [-1.2247,  0.    ,  1.2247]], dtype=float32)
    """
    xc, dtype = as_input(x, "x")
    axis = normalize_axis(axis, xc.ndim)
    rows, cols = _rows_cols(xc.shape, axis)
    weight = as_param(weight, "weight", xc.shape[axis:], np.float64)
    bias = as_param(bias, "bias", xc.shape[axis:], np.float64)
    eps = check_eps(eps)
    threads = resolve_num_threads(num_threads, xc.size)
    y = empty_result(xc.shape, xc.dtype)
    mean = np.empty(_stats_shape(xc.shape, axis), np.float64)
    invstd = np.empty_like(mean)
    _layer_norm.layer_norm(xc, weight, bias, y, mean, invstd, rows, cols, eps, threads)
    return _as_dtype(y, dtype), _as_dtype(mean, xc.dtype), _as_dtype(invstd, xc.dtype)


def layer_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                        weight: ArrayLike | None = None, *, axis: int = -1,
                        num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of layer_norm with respect to x, weight and bias.

    With xhat = (x - mean) * invstd and g = dy * weight, for every row r of x viewed as M x K:

        dx[r, k]   = invstd[r] * (g[r, k] - mean_k(g[r]) - xhat[r, k] * mean_k(g[r] * xhat[r]))
        dweight[k] = sum_r dy[r, k] * xhat[r, k]
        dbias[k]   = sum_r dy[r, k]

    `mean` only centres the rows: the kernel recomputes each row's exact mean in its reduction pass, so
    the float32 mean that layer_norm returns costs no accuracy.  `invstd` is used as given.

    Args:
        dy: gradient of the loss with respect to y, shape of x.
        x: the forward input.
        mean, invstd: as layer_norm returned them; any shape holding exactly M = prod(x.shape[:axis])
            values.
        weight: array of shape x.shape[axis:], or None for 1.
        axis, num_threads: as for layer_norm.

    Returns:
        (dx, dweight, dbias): dx like x; dweight and dbias of shape x.shape[axis:] in x's dtype (always
        computed, also when weight is None).

    Example:
        >>> x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
        >>> y, mean, invstd = layer_norm(x)
        >>> dx, dweight, dbias = layer_norm_backward(np.ones_like(x), x, mean, invstd)
        >>> bool(np.abs(dx).max() < 1e-5), dbias.tolist() == [4.0] * 8
        (True, True)
    """
    xc, dtype = as_input(x, "x")
    axis = normalize_axis(axis, xc.ndim)
    rows, cols = _rows_cols(xc.shape, axis)
    dy = as_like(dy, "dy", xc.shape, xc.dtype)
    mean = _row_statistic(mean, "mean", rows)
    invstd = _row_statistic(invstd, "invstd", rows)
    weight = as_param(weight, "weight", xc.shape[axis:], np.float64)
    threads = resolve_num_threads(num_threads, xc.size)
    dx = empty_result(xc.shape, xc.dtype)
    dweight = np.empty(xc.shape[axis:], np.float64)
    dbias = np.empty_like(dweight)
    _layer_norm.layer_norm_backward(dy, xc, mean, invstd, weight, dx, dweight, dbias, rows, cols, threads)
    return _as_dtype(dx, dtype), _as_dtype(dweight, dtype), _as_dtype(dbias, dtype)


def rms_norm(x: ArrayLike, weight: ArrayLike | None = None, *, axis: int = -1, eps: float = 1e-5,
             num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RMS normalization (ONNX RMSNormalization-23; torch.nn.functional.rms_norm for axis=-1).

    For every row r of x viewed as M x K (K = prod(x.shape[axis:])):

        invrms[r] = 1 / sqrt(sum_k x[r, k]^2 / K + eps)
        y[r, k]   = x[r, k] * invrms[r] * weight[k]

    Args:
        x: float16/32/64 array of any shape with at least one dimension, not empty.
        weight: array of shape x.shape[axis:], or None for 1.
        axis, eps, num_threads: as for layer_norm.

    Returns:
        (y, invrms): y like x; invrms of shape x.shape[:axis] + (1,) * (x.ndim - axis) in the compute
        dtype.

    Example:
        >>> y, invrms = rms_norm(np.array([[3.0, 4.0]]), eps=0.0)
        >>> y, invrms
        (array([[0.84852814, 1.13137085]]), array([[0.28284271]]))
    """
    xc, dtype = as_input(x, "x")
    axis = normalize_axis(axis, xc.ndim)
    rows, cols = _rows_cols(xc.shape, axis)
    weight = as_param(weight, "weight", xc.shape[axis:], np.float64)
    eps = check_eps(eps)
    threads = resolve_num_threads(num_threads, xc.size)
    y = empty_result(xc.shape, xc.dtype)
    invrms = np.empty(_stats_shape(xc.shape, axis), np.float64)
    _layer_norm.rms_norm(xc, weight, y, invrms, rows, cols, eps, threads)
    return _as_dtype(y, dtype), _as_dtype(invrms, xc.dtype)


def rms_norm_backward(dy: ArrayLike, x: ArrayLike, invrms: ArrayLike, weight: ArrayLike | None = None, *,
                      axis: int = -1, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of rms_norm with respect to x and weight.

    With g = dy * weight, for every row r of x viewed as M x K:

        dx[r, k]   = invrms[r] * g[r, k] - x[r, k] * invrms[r]^3 * mean_k(g[r] * x[r])
        dweight[k] = sum_r dy[r, k] * x[r, k] * invrms[r]

    Args:
        dy: gradient of the loss with respect to y, shape of x.
        x: the forward input.
        invrms: as rms_norm returned it; any shape holding exactly M = prod(x.shape[:axis]) values.
        weight: array of shape x.shape[axis:], or None for 1.
        axis, num_threads: as for layer_norm.

    Returns:
        (dx, dweight): dx like x; dweight of shape x.shape[axis:] in x's dtype.

    Example:
        >>> x = np.array([[3.0, 4.0]])
        >>> y, invrms = rms_norm(x, eps=0.0)
        >>> dx, dweight = rms_norm_backward(np.ones_like(x), x, invrms)
        >>> np.round(dx, 6), np.round(dweight, 6)
        (array([[ 0.045255, -0.033941]]), array([0.848528, 1.131371]))
    """
    xc, dtype = as_input(x, "x")
    axis = normalize_axis(axis, xc.ndim)
    rows, cols = _rows_cols(xc.shape, axis)
    dy = as_like(dy, "dy", xc.shape, xc.dtype)
    invrms = _row_statistic(invrms, "invrms", rows)
    weight = as_param(weight, "weight", xc.shape[axis:], np.float64)
    threads = resolve_num_threads(num_threads, xc.size)
    dx = empty_result(xc.shape, xc.dtype)
    dweight = np.empty(xc.shape[axis:], np.float64)
    _layer_norm.rms_norm_backward(dy, xc, invrms, weight, dx, dweight, rows, cols, threads)
    return _as_dtype(dx, dtype), _as_dtype(dweight, dtype)


def _rows_cols(shape, axis):
    return math.prod(shape[:axis]), math.prod(shape[axis:])


def _stats_shape(shape, axis):
    return tuple(shape[:axis]) + (1,) * (len(shape) - axis)


def _row_statistic(a, name, rows):
    """A per-row statistic (mean, invstd, invrms) of any shape holding `rows` values, as a flat float64 array."""
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    if a.dtype.kind != "f":
        raise TypeError("%s must be a float array, got dtype %s" % (name, a.dtype))
    if a.size != rows:
        raise ValueError(
            "%s must hold one value per normalized row (%d values, e.g. shape x.shape[:axis] + (1, ...)), "
            "got shape %s" % (name, rows, a.shape)
        )
    return np.ascontiguousarray(a.reshape(-1), dtype=np.float64)


def _as_dtype(a, dtype):
    return a if a.dtype == dtype else a.astype(dtype)
