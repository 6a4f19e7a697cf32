"""Group normalization and instance normalization (forward and backward) on NumPy arrays.

x is (N, C, *spatial).  Group normalization splits the C channels into num_groups consecutive groups and
normalizes each (sample, group) block over its C / num_groups channels and all spatial positions, then
applies a per-channel weight and bias (ONNX GroupNormalization-21, torch.nn.functional.group_norm).
Instance normalization is the case num_groups = C: each (sample, channel) plane is normalized over its
spatial positions (ONNX InstanceNormalization, torch.nn.functional.instance_norm without running stats).

Inputs may be float16, float32 or float64; float16 is computed in float32.  The statistics come from sums
centred near each cache-sized block's mean (float32 lanes added up in float64 when the cancellation is
provably small, else an exact float64 two-pass; blocks merged with Chan's update), never float32
E[x^2] - E[x]^2, and are returned in the compute dtype (float32 for float16 and float32).
Results are bit-identical for any number of threads.

Results of 4 MiB or more (y, dx) are views of memory that is recycled once every view of a result is gone
(their .base is set), which spares a page fault per page on each call; they behave as ordinary arrays.
"""
from __future__ import annotations

import operator

import numpy as np
from numpy.typing import ArrayLike

from . import _group_norm
from ._outputs import empty_result
from ._validation import as_input, as_like, as_param, check_activation, check_eps, compute_dtype
from .runtime import resolve_num_threads

_F64 = np.dtype(np.float64)


def group_norm(x: ArrayLike, num_groups: int, weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
               eps: float = 1e-5, activation: str | None = None,
               num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group normalization: y = (x - mean[n, g]) * invstd[n, g] * weight[c] + bias[c].

    For sample n and group g (channels g*C/G to (g+1)*C/G - 1), mean[n, g] and var[n, g] are the mean and
    population variance over those channels and every spatial position, and
    invstd[n, g] = 1 / sqrt(var[n, g] + eps).

    Args:
        x: (N, C, *spatial) float16/float32/float64 array, at least 2 dims.
        num_groups: positive int G dividing C.
        weight, bias: (C,) per-channel scale and shift; None means 1 and 0.
        eps: finite non-negative real number added to the variance.
        activation: None, "relu" (max(y, 0)) or "silu" (y * sigmoid(y)), applied to y in the same pass
            (group_norm_backward with the same bias and activation gives its gradients).
        num_threads: threads to use, a positive int; None uses foldnorm.get_num_threads().  Capped to the
            usable cores and to one thread per 128 Ki elements (runtime.PARALLEL_GRAIN).

    Returns:
        (y, mean, invstd): y shaped and typed like x; mean and invstd (N, G) in the compute dtype
        (float64 for float64 x, float32 otherwise).

    Example:
        >>> import numpy as np
        >>> from foldnorm import group_norm
        >>> x = np.array([[[0.0], [2.0], [10.0], [14.0]]], dtype=np.float32)  # (N=1, C=4, 1)
        >>> y, mean, invstd = group_norm(x, 2, eps=0.0)
        >>> y[:, :, 0]
        array([[-1.,  1., -1.,  1.]], dtype=float32)
        >>> mean
        array([[ 1., 12.]], dtype=float32)
    """
    x3, dtype, shape = _as_planes(x, "x", min_ndim=2)
    groups = _check_num_groups(num_groups, shape[1])
    return _forward(x3, dtype, shape, groups, weight, bias, eps, activation, num_threads)


def group_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike, num_groups: int,
                        weight: ArrayLike | None = None, *, bias: ArrayLike | None = None,
                        activation: str | None = None,
                        num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of group_norm with respect to x, weight and bias.

    With xhat = (x - mean[n, g]) * invstd[n, g] and m = C/G * prod(spatial) values per (n, g) block:
    dbias[c] = sum over n and spatial of dy, dweight[c] = sum of dy * xhat, and
    dx = invstd * (weight[c] * dy - mean_block(weight * dy) - xhat * mean_block(weight * dy * xhat)).

    Args:
        dy: gradient of the loss with respect to y, shaped like x.
        x: the forward's input, (N, C, *spatial).
        mean, invstd: (N, G) statistics returned by group_norm.
        num_groups: the forward's G.
        weight: the forward's (C,) weight, or None.
        bias, activation: the forward's; with an activation dy is the gradient of act(y), whose y before the
            activation is recomputed from x (bias is read only then), and dy * act'(y) takes dy's place above.
        num_threads: threads to use, a positive int; None uses foldnorm.get_num_threads().  Capped to the
            usable cores and to one thread per 128 Ki elements (runtime.PARALLEL_GRAIN).

    Returns:
        (dx, dweight, dbias): dx shaped like x; dweight and dbias (C,); all in x's dtype.

    Example:
        >>> import numpy as np
        >>> from foldnorm import group_norm, group_norm_backward
        >>> x = np.array([[[0.0], [2.0], [10.0], [14.0]]])
        >>> y, mean, invstd = group_norm(x, 2, eps=0.0)
        >>> dx, dweight, dbias = group_norm_backward(np.ones_like(x), x, mean, invstd, 2)
        >>> dx[:, :, 0], dbias
        (array([[0., 0., 0., 0.]]), array([1., 1., 1., 1.]))
    """
    x3, dtype, shape = _as_planes(x, "x", min_ndim=2)
    groups = _check_num_groups(num_groups, shape[1])
    return _backward(dy, x3, dtype, shape, mean, invstd, groups, weight, bias, activation, num_threads)


def instance_norm(x: ArrayLike, weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                  eps: float = 1e-5, activation: str | None = None,
                  num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance normalization: y = (x - mean[n, c]) * invstd[n, c] * weight[c] + bias[c].

    mean[n, c] and var[n, c] are the mean and population variance of plane x[n, c] over the spatial
    positions, invstd[n, c] = 1 / sqrt(var[n, c] + eps).  This is group_norm with num_groups = C.

    Args:
        x: (N, C, *spatial) float16/float32/float64 array, at least 3 dims (ONNX InstanceNormalization).
        weight, bias, eps, activation, num_threads: as for group_norm.

    Returns:
        (y, mean, invstd) as from group_norm, with mean and invstd (N, C).

    Example:
        >>> import numpy as np
        >>> from foldnorm import instance_norm
        >>> x = np.array([[[1.0, 3.0], [0.0, 8.0]]], dtype=np.float32)  # (N=1, C=2, 2)
        >>> y, mean, invstd = instance_norm(x, bias=np.array([0.0, 10.0]), eps=0.0)
        >>> y
        array([[[-1.,  1.],
                [ 9., 11.]]], dtype=float32)
        >>> invstd
        array([[1.  , 0.25]], dtype=float32)
    """
    x3, dtype, shape = _as_planes(x, "x", min_ndim=3)
    return _forward(x3, dtype, shape, shape[1], weight, bias, eps, activation, num_threads)


def instance_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                           weight: ArrayLike | None = None, *, bias: ArrayLike | None = None,
                           activation: str | None = None,
                           num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of instance_norm with respect to x, weight and bias.

    With xhat = (x - mean[n, c]) * invstd[n, c] and m = prod(spatial): dbias[c] = sum over n and spatial
    of dy, dweight[c] = sum of dy * xhat, and
    dx = invstd * weight[c] * (dy - mean_plane(dy) - xhat * mean_plane(dy * xhat)).

    Args:
        dy, x, weight, bias, activation, num_threads: as for group_norm_backward; x has at least one
            spatial dim.
        mean, invstd: (N, C) statistics returned by instance_norm.

    Returns:
        (dx, dweight, dbias) as from group_norm_backward.

    Example:
        >>> import numpy as np
        >>> from foldnorm import instance_norm, instance_norm_backward
        >>> x = np.array([[[1.0, 3.0], [0.0, 8.0]]])
        >>> y, mean, invstd = instance_norm(x, eps=0.0)
        >>> dx, dweight, dbias = instance_norm_backward(y, x, mean, invstd)
        >>> dx, dweight
        (array([[[0., 0.],
                [0., 0.]]]), array([2., 2.]))
    """
    x3, dtype, shape = _as_planes(x, "x", min_ndim=3)
    return _backward(dy, x3, dtype, shape, mean, invstd, shape[1], weight, bias, activation, num_threads)


def _as_planes(x, name, min_ndim):
    """x checked, in its compute dtype, viewed as C-contiguous (N, C, prod(spatial)); its dtype and shape."""
    xc, dtype = as_input(x, name, min_ndim=min_ndim)
    shape = xc.shape
    return xc.reshape(shape[0], shape[1], -1), dtype, shape


def _check_num_groups(num_groups, channels):
    expected = "num_groups must be a positive int that divides the number of channels (%d)" % channels
    if isinstance(num_groups, (bool, np.bool_)):
        raise TypeError("%s, got %r" % (expected, num_groups))
    try:
        groups = operator.index(num_groups)
    except TypeError:
        raise TypeError("%s, got %r" % (expected, num_groups)) from None
    if groups < 1 or channels % groups != 0:
        raise ValueError("%s, got %d" % (expected, groups))
    return groups


def _forward(x3, dtype, shape, groups, weight, bias, eps, activation, num_threads):
    channels = shape[1]
    weight = as_param(weight, "weight", (channels,), _F64)
    bias = as_param(bias, "bias", (channels,), _F64)
    eps = check_eps(eps)
    act = check_activation(activation)
    threads = resolve_num_threads(num_threads, x3.size)
    y = empty_result(x3.shape, x3.dtype)
    mean = np.empty((shape[0], groups), dtype=_F64)
    invstd = np.empty((shape[0], groups), dtype=_F64)
    _group_norm.forward(x3, y, groups, weight, bias, eps, act, mean, invstd, threads)
    stats_dtype = compute_dtype(dtype)
    return y.reshape(shape).astype(dtype, copy=False), mean.astype(stats_dtype), invstd.astype(stats_dtype)


def _backward(dy, x3, dtype, shape, mean, invstd, groups, weight, bias, activation, num_threads):
    batch, channels = shape[0], shape[1]
    dy3 = as_like(dy, "dy", shape, x3.dtype).reshape(x3.shape)
    mean = as_param(mean, "mean", (batch, groups), _F64, required=True)
    invstd = as_param(invstd, "invstd", (batch, groups), _F64, required=True)
    weight = as_param(weight, "weight", (channels,), _F64)
    bias = as_param(bias, "bias", (channels,), _F64)
    act = check_activation(activation)
    threads = resolve_num_threads(num_threads, x3.size)
    dx = empty_result(x3.shape, x3.dtype)
    dweight = np.empty(channels, dtype=_F64)
    dbias = np.empty(channels, dtype=_F64)
    _group_norm.backward(dy3, x3, dx, groups, mean, invstd, weight, bias, act, dweight, dbias, threads)
    return dx.reshape(shape).astype(dtype, copy=False), dweight.astype(dtype), dbias.astype(dtype)


__all__ = ["group_norm", "group_norm_backward", "instance_norm", "instance_norm_backward"]
