"""Batch normalization of NumPy arrays: inference with frozen statistics, training forward, backward.

x is (N, C, *spatial) with any number of spatial dims (channel_axis=1), or channels-last
(N, *spatial, C) (channel_axis=-1). float32 and float64 are computed in their own precision; float16 is
computed in float32 and its y returned as float16. Statistics come from sums centred near each
cache-sized block's mean (in float32 lanes added up in float64 when the cancellation is provably small,
else an exact float64 two-pass), blocks merged with Chan's update, never float32 E[x^2] - E[x]^2; every
result is bit-identical for any thread count.

Results of 4 MiB or more (y when out is None, dx) are views of memory that is recycled once every view of a
result is gone (their .base is set), which spares a page fault per page on each call; they behave as
ordinary arrays.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from . import _batch_norm
from ._outputs import empty_result
from ._validation import (
    as_bool,
    as_input,
    as_like,
    as_param,
    channel_layout,
    check_activation,
    check_eps,
    check_momentum,
    check_out,
    compute_dtype,
    finish_output,
    kernel_output,
    running_statistic,
)
from .runtime import resolve_num_threads

__all__ = ["batch_norm", "batch_norm_train", "batch_norm_backward"]


def batch_norm(x: ArrayLike, running_mean: ArrayLike, running_var: ArrayLike, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, *, eps: float = 1e-5, channel_axis: int = 1,
               activation: str | None = None, out: np.ndarray | None = None,
               num_threads: int | None = None) -> np.ndarray:
    """Batch normalization with frozen statistics (inference).

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel. It is computed as
    y = x * alpha + beta with alpha = weight / sqrt(running_var + eps) and
    beta = bias - running_mean * alpha (both in float64, then cast): one pass over x.  With an activation,
    y = act(that), in the same pass.

    Parameters
    ----------
    x : ndarray (N, C, *spatial), or (N, *spatial, C) with channel_axis=-1; float16, float32 or float64.
    running_mean, running_var : array-like (C,).
    weight, bias : array-like (C,) or None (1 and 0).
    eps : finite non-negative real number added to the variance.
    channel_axis : 1 (channels first) or -1 (channels last).
    activation : None, "relu" (max(y, 0)) or "silu" (y * sigmoid(y)), applied to y in the same pass.
    out : optional ndarray of x's shape and dtype to write y into; must not overlap any input.
    num_threads : positive int, or None for foldnorm.get_num_threads(); capped to the usable cores and to
        one thread per 128 Ki elements (foldnorm.kernels.runtime.PARALLEL_GRAIN).

    Returns
    -------
    y : ndarray of x's shape and dtype (out when given).

    Example
    -------
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> y = batch_norm(x, np.zeros(3), np.ones(3), weight=np.full(3, 2.0), bias=np.ones(3))
    >>> y.shape, y.dtype
    ((8, 3, 4, 4), dtype('float32'))
    """
    xc, dtype = as_input(x, "x", min_ndim=2)
    outer, channels, inner = channel_layout(xc.shape, channel_axis)
    mean = as_param(running_mean, "running_mean", (channels,), np.float64, required=True)
    var = as_param(running_var, "running_var", (channels,), np.float64, required=True)
    weight64 = as_param(weight, "weight", (channels,), np.float64)
    bias64 = as_param(bias, "bias", (channels,), np.float64)
    eps = check_eps(eps)
    act = check_activation(activation)
    threads = resolve_num_threads(num_threads, xc.size)
    out = check_out(out, xc.shape, dtype, _named_arrays(x=x, running_mean=running_mean,
                                                         running_var=running_var, weight=weight, bias=bias))
    written, out = kernel_output(out, xc.shape, dtype)
    _batch_norm.batch_norm(xc.reshape(-1), written.reshape(-1), outer, channels, inner, mean, var, weight64,
                           bias64, eps, act, threads)
    return finish_output(written, out, dtype)


def batch_norm_train(x: ArrayLike, weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                     running_mean: np.ndarray | None = None, running_var: np.ndarray | None = None,
                     momentum: float = 0.1, running_var_unbiased: bool = True, eps: float = 1e-5,
                     channel_axis: int = 1, activation: str | None = None, out: np.ndarray | None = None,
                     num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch normalization with the statistics of the batch (training forward).

    Per channel, over the n = N * prod(spatial) values of the batch:
    mean = sum(x) / n, var = sum((x - mean)^2) / n (biased), invstd = 1 / sqrt(var + eps),
    y = (x - mean) * invstd * weight + bias, or act of it with an activation (applied in the same pass;
    batch_norm_backward with the same bias and activation gives its gradients).

    running_mean and running_var, when given, are updated in place (PyTorch's convention):
    running = (1 - momentum) * running + momentum * batch, where the batch variance stored is the
    unbiased var * n / (n - 1) when running_var_unbiased is true, else var. The update is computed in
    float64 and stored in the arrays' own dtype.

    ONNX BatchNormalization with training_mode=1 updates running = momentum_onnx * running +
    (1 - momentum_onnx) * batch with the population variance; the same update here is
    momentum = 1 - momentum_onnx, running_var_unbiased=False (so ONNX's default 0.9 is momentum=0.1).

    Parameters
    ----------
    x : ndarray (N, C, *spatial), or (N, *spatial, C) with channel_axis=-1; float16, float32 or float64.
        Needs more than one value per channel.
    weight, bias : array-like (C,) or None (1 and 0).
    running_mean, running_var : writable float ndarrays (C,), or None.
    momentum : float in [0, 1], the weight of the batch statistics in the running update.
    running_var_unbiased : bool, store the unbiased (True) or the population (False) batch variance.
    eps : finite non-negative real number added to the variance.
    channel_axis : 1 (channels first) or -1 (channels last).
    activation : None, "relu" or "silu", as for batch_norm.
    out : optional ndarray of x's shape and dtype to write y into; must not overlap any input.
    num_threads : positive int, or None for foldnorm.get_num_threads(); capped to the usable cores and to
        one thread per 128 Ki elements (foldnorm.kernels.runtime.PARALLEL_GRAIN).

    Returns
    -------
    (y, mean, invstd) : y of x's shape and dtype (out when given); mean and invstd (C,) in the compute
    dtype (float32 for float16 and float32 x, float64 for float64 x).

    Example
    -------
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> running_mean, running_var = np.zeros(3), np.ones(3)
    >>> y, mean, invstd = batch_norm_train(x, running_mean=running_mean, running_var=running_var)
    >>> bool(abs(y.mean()) < 1e-6), mean.shape, invstd.dtype
    (True, (3,), dtype('float32'))
    """
    xc, dtype = as_input(x, "x", min_ndim=2)
    outer, channels, inner = channel_layout(xc.shape, channel_axis)
    count = outer * inner
    if count < 2:
        raise ValueError("expected more than 1 value per channel when training, got input of shape %s"
                         % (xc.shape,))
    weight64 = as_param(weight, "weight", (channels,), np.float64)
    bias64 = as_param(bias, "bias", (channels,), np.float64)
    running_mean = running_statistic(running_mean, "running_mean", channels)
    running_var = running_statistic(running_var, "running_var", channels)
    if running_mean is not None and running_var is not None and np.shares_memory(running_mean, running_var):
        raise ValueError("running_mean and running_var must not overlap")
    momentum = check_momentum(momentum)
    running_var_unbiased = as_bool(running_var_unbiased, "running_var_unbiased")
    eps = check_eps(eps)
    act = check_activation(activation)
    threads = resolve_num_threads(num_threads, xc.size)
    out = check_out(out, xc.shape, dtype, _named_arrays(x=x, weight=weight, bias=bias,
                                                         running_mean=running_mean, running_var=running_var))
    written, out = kernel_output(out, xc.shape, dtype)
    mean = np.empty(channels)
    var = np.empty(channels)
    invstd = np.empty(channels)
    _batch_norm.batch_norm_train(xc.reshape(-1), written.reshape(-1), outer, channels, inner, weight64, bias64,
                                 eps, act, mean, var, invstd, threads)
    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
    if running_var is not None:
        batch_var = var * (count / (count - 1.0)) if running_var_unbiased else var
        running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + momentum * batch_var
    stats_dtype = compute_dtype(dtype)
    return finish_output(written, out, dtype), mean.astype(stats_dtype), invstd.astype(stats_dtype)


def batch_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                        weight: ArrayLike | None = None, *, bias: ArrayLike | None = None,
                        activation: str | None = None, channel_axis: int = 1,
                        num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of batch_norm_train's y with respect to x, weight and bias.

    With n = N * prod(spatial) values per channel and xhat = (x - mean) * invstd:
    dbias = sum(g), dweight = sum(g * xhat),
    dx = weight * invstd * (g - dbias / n - xhat * dweight / n),
    where g = dy, or with an activation g = dy * act'(xhat * weight + bias): dy is then the gradient of
    act(y), and the y before the activation is recomputed from x in both passes (nothing is stored).
    One fused pass computes sum(g) and sum(g * (x - mean)) in float64, a second one writes dx.

    Parameters
    ----------
    dy : ndarray of x's shape, the gradient of the loss with respect to y.
    x : ndarray (N, C, *spatial), or (N, *spatial, C) with channel_axis=-1; float16, float32 or float64.
    mean, invstd : array-like (C,), as returned by batch_norm_train.
    weight : array-like (C,) or None (1).
    bias : array-like (C,) or None (0); read only with an activation.
    activation : None, "relu" or "silu": the forward's.
    channel_axis : 1 (channels first) or -1 (channels last).
    num_threads : positive int, or None for foldnorm.get_num_threads(); capped to the usable cores and to
        one thread per 128 Ki elements (foldnorm.kernels.runtime.PARALLEL_GRAIN).

    Returns
    -------
    (dx, dweight, dbias) : dx of x's shape, dweight and dbias (C,), all in x's dtype.

    Example
    -------
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4))
    >>> y, mean, invstd = batch_norm_train(x)
    >>> dx, dweight, dbias = batch_norm_backward(np.ones_like(x), x, mean, invstd)
    >>> bool(np.abs(dx).max() < 1e-12), dbias
    (True, array([128., 128., 128.]))
    """
    xc, dtype = as_input(x, "x", min_ndim=2)
    dyc = as_like(dy, "dy", xc.shape, xc.dtype)
    outer, channels, inner = channel_layout(xc.shape, channel_axis)
    mean64 = as_param(mean, "mean", (channels,), np.float64, required=True)
    invstd64 = as_param(invstd, "invstd", (channels,), np.float64, required=True)
    weight64 = as_param(weight, "weight", (channels,), np.float64)
    bias64 = as_param(bias, "bias", (channels,), np.float64)
    act = check_activation(activation)
    threads = resolve_num_threads(num_threads, xc.size)
    dx = empty_result(xc.shape, xc.dtype)
    dweight = np.empty(channels)
    dbias = np.empty(channels)
    _batch_norm.batch_norm_backward(dyc.reshape(-1), xc.reshape(-1), dx.reshape(-1), outer, channels, inner,
                                    mean64, invstd64, weight64, bias64, act, dweight, dbias, threads)
    return dx.astype(dtype, copy=False), dweight.astype(dtype), dbias.astype(dtype)


def _named_arrays(**arrays):
    """(name, array) pairs of the ndarray arguments, for check_out's overlap test."""
    return [(name, a) for name, a in arrays.items() if isinstance(a, np.ndarray)]
