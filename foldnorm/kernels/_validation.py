"""Argument checks shared by the public kernel functions.

The compiled layer trusts its inputs; everything a user can get wrong is caught here, with an error that
names the argument and says what was expected.
"""
import math
import numbers
import operator
import reprlib

import numpy as np

from ._outputs import empty_result

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def compute_dtype(dtype):
    """The dtype the kernels compute in: float16 is computed in float32."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def as_input(x, name, min_ndim=1, allow_empty=False):
    """x as an array of a float dtype with at least min_ndim dims and, unless allow_empty (a shard of a batch
    split over processes), no zero-sized dim.

    Returns (array in the compute dtype, C-contiguous, and the caller's dtype for the result).
    """
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError("%s must be a float16, float32 or float64 array, got dtype %s" % (name, x.dtype))
    if x.ndim < min_ndim:
        raise ValueError("%s must have at least %d dimensions, got shape %s" % (name, min_ndim, x.shape))
    if x.size == 0 and not allow_empty:
        raise ValueError("%s must not be empty, got shape %s" % (name, x.shape))
    return np.ascontiguousarray(x, dtype=compute_dtype(x.dtype)), x.dtype


def as_like(a, name, shape, dtype):
    """A second tensor input (dy, ...) that must have exactly `shape`; returned C-contiguous in dtype."""
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError("%s must be a float16, float32 or float64 array, got dtype %s" % (name, a.dtype))
    if a.shape != tuple(shape):
        raise ValueError("%s must have shape %s, got %s" % (name, tuple(shape), a.shape))
    return np.ascontiguousarray(a, dtype=dtype)


def as_param(p, name, shape, dtype, required=False):
    """A per-channel (or per-feature) parameter of exactly `shape`, or None when absent and optional."""
    if p is None:
        if required:
            raise TypeError("%s is required" % name)
        return None
    if not isinstance(p, np.ndarray):
        p = np.asarray(p)
    if p.dtype.kind not in "fiu":
        raise TypeError("%s must be a real numeric array, got dtype %s" % (name, p.dtype))
    shape = tuple(shape)
    if p.shape != shape:
        raise ValueError("%s must have shape %s, got %s" % (name, shape, p.shape))
    return np.ascontiguousarray(p, dtype=dtype)


def channel_layout(shape, channel_axis, name="x"):
    """The (outer, channels, inner) view of a batch-norm input of `shape` that the kernels work on:
    (N, C * prod(spatial)) as (N, C, prod(spatial)) for channel_axis 1, (N * prod(spatial), C, 1) for -1."""
    try:
        axis = operator.index(channel_axis)
    except TypeError:
        axis = None
    if isinstance(channel_axis, (bool, np.bool_)) or axis not in (1, -1):
        raise ValueError("channel_axis must be 1 (channels first) or -1 (channels last), got %r"
                         % (channel_axis,))
    if shape[axis] == 0:
        raise ValueError("%s must have at least one channel, got shape %s" % (name, tuple(shape)))
    if axis == 1:
        return shape[0], shape[1], math.prod(shape[2:])
    return math.prod(shape[:-1]), shape[-1], 1


def running_statistic(a, name, channels):
    """A running_mean/running_var argument: None, or a writable float ndarray of shape (channels,)."""
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        raise TypeError("%s must be a numpy.ndarray (it is updated in place), got %s" % (name, type(a).__name__))
    if a.dtype.kind != "f":
        raise TypeError("%s must be a float array, got dtype %s" % (name, a.dtype))
    if a.shape != (channels,):
        raise ValueError("%s must have shape %s, got %s" % (name, (channels,), a.shape))
    if not a.flags.writeable:
        raise ValueError("%s must be writable (it is updated in place)" % name)
    return a


def normalize_axis(axis, ndim, name="axis"):
    """An int axis (NumPy integers too) in [-ndim, ndim) as a non-negative int."""
    index = as_int(axis, name)
    if not -ndim <= index < ndim:
        raise ValueError("%s=%d is out of range for an input with %d dimensions" % (name, index, ndim))
    return index % ndim


def as_int(value, name):
    """value as a Python int: an int or a NumPy integer, never a bool, a float or a string."""
    if not isinstance(value, (bool, np.bool_)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError("%s must be an int, got %s" % (name, reprlib.repr(value)))


def as_bool(value, name):
    """value as a Python bool: True, False or a NumPy bool, never an int or a string."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError("%s must be a bool, got %s" % (name, reprlib.repr(value)))


def as_real(value, name, expected="a finite real number"):
    """value as a finite Python float: an int, a float or a NumPy number, never a bool or a string."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(_real_message(value, name, expected))
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(_real_message(value, name, expected)) from None
    if not math.isfinite(number):
        raise ValueError(_real_message(value, name, expected))
    return number


def _real_message(value, name, expected):
    # Written only when raising: the checks run on every call of a training step.
    return "%s must be %s, got %s" % (name, expected, reprlib.repr(value))


ACTIVATIONS = {None: 0, "relu": 1, "silu": 2}  # the kernels' fn_activation values


def check_activation(activation):
    """The kernels' code of an activation: None, "relu" or "silu"."""
    expected = "None, 'relu' or 'silu'"
    if activation is not None and not isinstance(activation, str):
        raise TypeError("activation must be %s, got %s" % (expected, reprlib.repr(activation)))
    if activation not in ACTIVATIONS:
        raise ValueError("activation must be %s, got %s" % (expected, reprlib.repr(activation)))
    return ACTIVATIONS[activation]


def check_eps(eps):
    """eps as a float: a finite non-negative real number (int, float or NumPy number)."""
    expected = "a finite non-negative real number"
    value = as_real(eps, "eps", expected)
    if value < 0.0:
        raise ValueError("eps must be %s, got %s" % (expected, reprlib.repr(eps)))
    return value


def check_momentum(momentum):
    """momentum as a float: the batch's weight in a running-statistic update, a real number in [0, 1]
    (outside it the update extrapolates away from both the running and the batch statistics)."""
    expected = "a real number in [0, 1]"
    value = as_real(momentum, "momentum", expected)
    if not 0.0 <= value <= 1.0:
        raise ValueError("momentum must be %s, got %s" % (expected, reprlib.repr(momentum)))
    return value


def check_out(out, shape, dtype, inputs, name="out"):
    """Validate a caller-supplied output array; None passes through.

    out must be a writable ndarray of exactly `shape` and `dtype` that shares no memory with any of
    `inputs` (the kernels read inputs while they write out).
    """
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError("%s must be a numpy.ndarray, got %s" % (name, type(out).__name__))
    if out.shape != tuple(shape):
        raise ValueError("%s must have shape %s, got %s" % (name, tuple(shape), out.shape))
    if out.dtype != dtype:
        raise TypeError("%s must have dtype %s, got %s" % (name, np.dtype(dtype), out.dtype))
    if not out.flags.writeable:
        raise ValueError("%s must be writable" % name)
    for input_name, a in inputs:
        if a is not None and np.shares_memory(out, a):
            raise ValueError("%s must not overlap %s" % (name, input_name))
    return out


def kernel_output(out, shape, dtype):
    """(array the kernel writes, array returned to the caller).

    The kernel needs a C-contiguous array of the compute dtype; when `out` is not one, or the result is
    float16, the kernel writes a temporary that `finish_output` copies into place.  What is allocated here
    (the result or that temporary) comes from `empty_result`, so a large one reuses recycled memory.
    """
    cdtype = compute_dtype(dtype)
    if out is not None and out.dtype == cdtype and out.flags.c_contiguous:
        return out, out
    return empty_result(shape, cdtype), out


def finish_output(written, out, dtype):
    """The caller's result: `out` filled from `written`, or `written` cast to the caller's dtype."""
    if out is not None:
        if written is not out:
            np.copyto(out, written, casting="unsafe")
        return out
    return written if written.dtype == dtype else written.astype(dtype)
