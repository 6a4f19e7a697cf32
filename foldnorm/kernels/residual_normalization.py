"""Residual layer and RMS normalization: s = x + residual, then the normalization of s, in one pass.

A transformer block adds a sublayer's output x to the residual stream and normalizes the sum.  Run as two
calls that is two passes over memory (add, then norm); here s and y = norm(s) are written in the pass that
reads x and residual, each row summed into a cache-resident buffer, written out and normalized from there.

The residual stream can be updated in place, as vLLM's fused_add_rms_norm does: s_out may be x or residual
itself, and out (y) the other one, e.g. ``add_rms_norm(x, residual, w, out=x, s_out=residual)``.  The rules:
each of out and s_out may be exactly x or exactly residual (the same array: same memory, shape and strides)
or share no memory with any input; out and s_out never overlap each other; any other overlap (a shifted
view, a part of an input) is refused with a ValueError, since rows would be read after they were written.

dtypes, statistics, axis and thread counts follow foldnorm.kernels.layer_normalization: float32 and
float64 (float16 computed in float32), statistics in the compute dtype with ONNX's shape, results
bit-identical for any num_threads.  The backward passes take the gradient arriving on s as well (ds: s
is the residual stream the next block reads) and return dx, the gradient of both x and residual.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from . import _layer_norm
from ._outputs import empty_result
from ._validation import as_input, as_like, as_param, check_eps, check_out, finish_output, kernel_output, normalize_axis
from .layer_normalization import _as_dtype, _row_statistic, _rows_cols, _stats_shape
from .runtime import resolve_num_threads

__all__ = ["add_layer_norm", "add_layer_norm_backward", "add_rms_norm", "add_rms_norm_backward"]


def add_layer_norm(x: ArrayLike, residual: ArrayLike, weight: ArrayLike | None = None,
                   bias: ArrayLike | None = None, *, axis: int = -1, eps: float = 1e-5,
                   out: np.ndarray | None = None, s_out: np.ndarray | None = None,
                   num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """s = x + residual and y = layer_norm(s, weight, bias) in one pass.

    Args:
        x, residual: float16/32/64 arrays of one shape and dtype, with at least one dimension, not empty.
        weight, bias: arrays of shape x.shape[axis:], or None for 1 and 0.
        axis: first normalized dimension, in [-x.ndim, x.ndim).
        eps: finite non-negative real number added to the variance.
        out, s_out: optional writable arrays of x's shape and dtype for y and s; each may be x or residual
            itself (see the module docstring), never each other.
        num_threads: threads to use, a positive int; None means foldnorm.get_num_threads().

    Returns:
        (y, s, mean, invstd): y and s like x (out and s_out when given); mean and invstd of s, shaped
        x.shape[:axis] + (1,) * (x.ndim - axis), in the compute dtype.

    Example:
        >>> x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
        >>> y, s, mean, invstd = add_layer_norm(x, np.array([[1.0, 0.0, 1.0]], dtype=np.float32))
        >>> s, mean.ravel()
        (array([[2., 2., 4.]], dtype=float32), array([2.6666667], dtype=float32))
    """
    call = _ResidualCall(x, residual, axis, weight, bias, eps, out, s_out, num_threads)
    mean = np.empty(call.stats_shape, np.float64)
    invstd = np.empty_like(mean)
    _layer_norm.add_layer_norm(call.x, call.residual, call.weight, call.bias, call.y, call.s, mean, invstd,
                               call.rows, call.cols, call.eps, call.threads)
    y, s = call.results()
    return y, s, _as_dtype(mean, call.x.dtype), _as_dtype(invstd, call.x.dtype)


def add_rms_norm(x: ArrayLike, residual: ArrayLike, weight: ArrayLike | None = None, *, axis: int = -1,
                 eps: float = 1e-5, out: np.ndarray | None = None, s_out: np.ndarray | None = None,
                 num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """s = x + residual and y = rms_norm(s, weight) in one pass (vLLM's fused_add_rms_norm, on the CPU).

    Args:
        x, residual, weight, axis, eps, out, s_out, num_threads: as for add_layer_norm.

    Returns:
        (y, s, invrms): y and s like x (out and s_out when given); invrms of s, shaped
        x.shape[:axis] + (1,) * (x.ndim - axis), in the compute dtype.

    Example:
        >>> x = np.array([[1.0, 2.0]])
        >>> residual = np.array([[2.0, 2.0]])
        >>> y, s, invrms = add_rms_norm(x, residual, out=x, s_out=residual)  # the stream updated in place
        >>> residual, np.round(x, 4)
        (array([[3., 4.]]), array([[0.8485, 1.1314]]))
    """
    call = _ResidualCall(x, residual, axis, weight, None, eps, out, s_out, num_threads)
    invrms = np.empty(call.stats_shape, np.float64)
    _layer_norm.add_rms_norm(call.x, call.residual, call.weight, call.y, call.s, invrms, call.rows, call.cols,
                             call.eps, call.threads)
    y, s = call.results()
    return y, s, _as_dtype(invrms, call.x.dtype)


def add_layer_norm_backward(dy: ArrayLike, ds: ArrayLike, s: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                            weight: ArrayLike | None = None, *, axis: int = -1,
                            num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of add_layer_norm with respect to x (and residual, the same), weight and bias.

    dx = layer_norm_backward(dy, s, mean, invstd, weight)'s dx + ds, in one pass over dy, ds and s.

    Args:
        dy: gradient of the loss with respect to y, shaped like s.
        ds: gradient of the loss with respect to s through its other uses (the residual stream), like s.
        s: the forward's s; mean, invstd: its statistics, as add_layer_norm returned them.
        weight, axis, num_threads: as for add_layer_norm.

    Returns:
        (dx, dweight, dbias): dx like s, the gradient of both x and residual; dweight and dbias of shape
        s.shape[axis:]; all in s's dtype.

    Example:
        >>> x, residual = np.array([[1.0, 2.0, 4.0]]), np.zeros((1, 3))
        >>> y, s, mean, invstd = add_layer_norm(x, residual)
        >>> dx, dweight, dbias = add_layer_norm_backward(np.zeros_like(y), np.ones_like(s), s, mean, invstd)
        >>> dx
        array([[1., 1., 1.]])
    """
    sc, dtype, dyc, dsc, rows, cols, weight, threads, axis = _backward_inputs(dy, ds, s, axis, weight, num_threads)
    mean = _row_statistic(mean, "mean", rows)
    invstd = _row_statistic(invstd, "invstd", rows)
    dx = empty_result(sc.shape, sc.dtype)
    dweight = np.empty(sc.shape[axis:], np.float64)
    dbias = np.empty_like(dweight)
    _layer_norm.add_layer_norm_backward(dyc, dsc, sc, mean, invstd, weight, dx, dweight, dbias, rows, cols,
                                        threads)
    return _as_dtype(dx, dtype), _as_dtype(dweight, dtype), _as_dtype(dbias, dtype)


def add_rms_norm_backward(dy: ArrayLike, ds: ArrayLike, s: ArrayLike, invrms: ArrayLike,
                          weight: ArrayLike | None = None, *, axis: int = -1,
                          num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of add_rms_norm with respect to x (and residual, the same) and weight.

    dx = rms_norm_backward(dy, s, invrms, weight)'s dx + ds, in one pass over dy, ds and s.

    Args:
        dy, ds, s, weight, axis, num_threads: as for add_layer_norm_backward.
        invrms: the forward's, as add_rms_norm returned it.

    Returns:
        (dx, dweight): dx like s, the gradient of both x and residual; dweight of shape s.shape[axis:];
        both in s's dtype.

    Example:
        >>> y, s, invrms = add_rms_norm(np.array([[3.0, 4.0]]), np.zeros((1, 2)))
        >>> dx, dweight = add_rms_norm_backward(np.zeros((1, 2)), np.ones((1, 2)), s, invrms)
        >>> dx
        array([[1., 1.]])
    """
    sc, dtype, dyc, dsc, rows, cols, weight, threads, axis = _backward_inputs(dy, ds, s, axis, weight, num_threads)
    invrms = _row_statistic(invrms, "invrms", rows)
    dx = empty_result(sc.shape, sc.dtype)
    dweight = np.empty(sc.shape[axis:], np.float64)
    _layer_norm.add_rms_norm_backward(dyc, dsc, sc, invrms, weight, dx, dweight, rows, cols, threads)
    return _as_dtype(dx, dtype), _as_dtype(dweight, dtype)


class _ResidualCall:
    """A residual forward's checked arguments, and the arrays its kernel writes y and s into."""

    def __init__(self, x, residual, axis, weight, bias, eps, out, s_out, num_threads):
        self.x, self.dtype = as_input(x, "x")
        if isinstance(residual, np.ndarray) and isinstance(x, np.ndarray) and residual.dtype != x.dtype:
            raise TypeError("residual must have x's dtype %s, got %s" % (x.dtype, residual.dtype))
        self.residual = as_like(residual, "residual", self.x.shape, self.x.dtype)
        axis = normalize_axis(axis, self.x.ndim)
        self.rows, self.cols = _rows_cols(self.x.shape, axis)
        self.stats_shape = _stats_shape(self.x.shape, axis)
        self.weight = as_param(weight, "weight", self.x.shape[axis:], np.float64)
        self.bias = as_param(bias, "bias", self.x.shape[axis:], np.float64)
        self.eps = check_eps(eps)
        self.threads = resolve_num_threads(num_threads, self.x.size)
        params = [(n, a) for n, a in (("weight", weight), ("bias", bias)) if isinstance(a, np.ndarray)]
        streams = [(n, a) for n, a in (("x", x), ("residual", residual)) if isinstance(a, np.ndarray)]
        out = check_out(out, self.x.shape, self.dtype, params)
        s_out = check_out(s_out, self.x.shape, self.dtype, params + ([("out", out)] if out is not None else []),
                          name="s_out")
        for name, a in (("out", out), ("s_out", s_out)):
            _check_stream_alias(name, a, streams)
        self.y, self.out = kernel_output(out, self.x.shape, self.dtype)
        self.s, self.s_out = kernel_output(s_out, self.x.shape, self.dtype)

    def results(self):
        return finish_output(self.y, self.out, self.dtype), finish_output(self.s, self.s_out, self.dtype)


def _check_stream_alias(name, out, streams):
    """out may be x or residual itself, or share no memory with them: never a part or a shifted view."""
    if out is None:
        return
    for input_name, a in streams:
        if np.shares_memory(out, a) and not _same_array(out, a):
            raise ValueError("%s must be %s itself or share no memory with it (rows would be read after they were "
                             "written)" % (name, input_name))


def _same_array(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.shape == b.shape
            and a.strides == b.strides and a.dtype == b.dtype)


def _backward_inputs(dy, ds, s, axis, weight, num_threads):
    sc, dtype = as_input(s, "s")
    axis = normalize_axis(axis, sc.ndim)
    rows, cols = _rows_cols(sc.shape, axis)
    dyc = as_like(dy, "dy", sc.shape, sc.dtype)
    dsc = as_like(ds, "ds", sc.shape, sc.dtype)
    weight = as_param(weight, "weight", sc.shape[axis:], np.float64)
    threads = resolve_num_threads(num_threads, sc.size)
    return sc, dtype, dyc, dsc, rows, cols, weight, threads, axis
