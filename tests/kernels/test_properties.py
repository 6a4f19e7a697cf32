"""Property-based checks of every public kernel against float64 NumPy references (hypothesis).

Each example draws a shape (any rank the kernel takes, sizes down to 1), a dtype (float16, float32,
float64), a magnitude, an eps, optional affine parameters, a layout in memory (contiguous, strided,
reversed, transposed) and a thread count, and checks every output against a float64 reference within a
tolerance relative to the largest magnitude involved.  The thread cap and the work grain are lifted for
the module, so the drawn count really runs, and every result must also equal the one-thread result bit
for bit.  Inputs with a zero-sized dimension must be refused with an error naming x.

Magnitudes run from 1e-30 to 1e30 (float16 from 1e-4 to 1e3, what it can hold), the band beyond 1e18 and
below 1e-18 apart: there the float32 backward of RMS, group and instance normalization is not yet accurate
(above about 1e19; below about 1e-19 with eps=0 it gives inf), and those cases are expected failures until
the C kernels handle them.
"""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import foldnorm
from foldnorm.kernels import runtime
from tests.kernels.kernel_refs import reference_group_norm, reference_group_norm_backward

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Error allowed per unit of the largest magnitude involved, by input dtype (float16 results are rounded
# to float16: 2**-11 of their own size).
TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4, np.dtype(np.float16): 4e-3}

# Decimal exponents of the data's magnitude, and the dtypes, of each band.
ORDINARY_EXPONENTS = st.floats(-18.0, 18.0)
EXTREME_EXPONENTS = st.one_of(st.floats(-30.0, -18.0), st.floats(18.0, 30.0))
BANDS = {
    "ordinary": (ORDINARY_EXPONENTS, (np.float16, np.float32, np.float64)),
    "extreme_float64": (EXTREME_EXPONENTS, (np.float64,)),
    "extreme_float32": (EXTREME_EXPONENTS, (np.float32,)),
}
FLOAT16_EXPONENTS = st.floats(-4.0, 3.0)

@pytest.fixture(scope="module", autouse=True)
def caps_lifted():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "PARALLEL_GRAIN", 1)
        patch.setattr(runtime, "usable_cores", lambda: 8)
        yield


# ---------------------------------------------------------------------------------------------------
# Data


@st.composite
def draws(draw, band, shape_strategy):
    """Everything but the kernel's own arguments: shape, dtype, data, layout, eps, threads."""
    exponents, dtypes = BANDS[band]
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    return {
        "shape": draw(shape_strategy),
        "dtype": dtype,
        "magnitude": 10.0 ** draw(FLOAT16_EXPONENTS if dtype == np.float16 else exponents),
        "offset": draw(st.floats(-3.0, 3.0)),
        "layout": draw(st.sampled_from(["contiguous", "strided", "reversed", "transposed"])),
        "eps": draw(st.sampled_from([0.0, 1e-6, 1e-5, 1e-3, 0.5])),
        "threads": draw(st.sampled_from([1, 2, 3, 7, 8, 100000, None])),
        "affine": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def laid_out(values, layout, rng):
    """values (C-contiguous) as an equal array laid out in memory as `layout` says."""
    if layout == "contiguous" or values.ndim == 0:
        return values
    axis = int(rng.integers(values.ndim))
    if layout == "strided":
        wide = np.repeat(values, 2, axis=axis)
        return wide[(slice(None),) * axis + (slice(None, None, 2),)]
    if layout == "reversed":
        return np.flip(np.flip(values, axis=axis).copy(), axis=axis)
    return np.ascontiguousarray(values.T).T  # transposed: Fortran order


def tensor(d, rng, shape=None):
    """Seeded data of d's shape, dtype and magnitude, around offset * magnitude, laid out as d says."""
    shape = d["shape"] if shape is None else shape
    values = (d["magnitude"] * (d["offset"] + rng.standard_normal(shape))).astype(d["dtype"])
    assume(np.all(np.isfinite(values)))
    out = laid_out(values, d["layout"], rng)
    assert np.array_equal(out, values)
    return out


def affine(d, rng, shape):
    if not d["affine"]:
        return None, None
    return rng.uniform(-2.0, 2.0, shape), rng.standard_normal(shape)


# ---------------------------------------------------------------------------------------------------
# References: rows of a 2-D float64 view normalized on their own, weight and bias along the columns or rows


def rows_forward(x2, eps, centred=True):
    """(xhat, mean, invstd) of each row; mean is 0 for RMS normalization."""
    mean = x2.mean(axis=1) if centred else np.zeros(x2.shape[0])
    d = x2 - mean[:, None]
    var = (d * d).mean(axis=1)
    assume(np.all(var + eps > 0))
    invstd = 1.0 / np.sqrt(var + eps)
    return d * invstd[:, None], mean, invstd


def rows_dx(g2, xhat, invstd, centred=True):
    """dx of each row for g = dy * weight, and the magnitude of the terms it is made of."""
    mean_g = g2.mean(axis=1, keepdims=True) if centred else 0.0
    mean_gx = (g2 * xhat).mean(axis=1, keepdims=True)
    dx = invstd[:, None] * (g2 - mean_g - xhat * mean_gx)
    terms = invstd[:, None] * (np.abs(g2) + np.abs(mean_g) + np.abs(xhat * mean_gx))
    return dx, terms.max(initial=0.0)


def assert_within(actual, expected, scale, dtype, what):
    """|actual - expected| <= TOLERANCE[dtype] * scale everywhere (scale broadcasts against expected)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, "%s: shape %s, expected %s" % (what, actual.shape, expected.shape)
    bound = TOLERANCE[np.dtype(dtype)] * np.broadcast_to(scale, expected.shape)
    error = np.abs(actual - expected)
    worst = np.argmax(error - bound) if error.size else 0
    assert np.all(error <= bound), "%s: error %g where %g is allowed" % (
        what, error.ravel()[worst], bound.ravel()[worst])


def assert_results(actual, expected, dtype):
    """actual: the kernel's outputs; expected: (name, value, scale, check dtype) per output."""
    assert len(actual) == len(expected)
    for a, (what, value, scale, out_dtype) in zip(actual, expected):
        assert a.dtype == out_dtype, "%s: dtype %s, expected %s" % (what, a.dtype, out_dtype)
        assert_within(a, value, scale, dtype, what)


def largest_sum(terms, axis):
    """The largest magnitude involved in sums of terms along axis: the largest sum of their magnitudes."""
    return np.abs(terms).sum(axis=axis).max(initial=0.0)


def stats_dtype(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def same_bits_as_one_thread(run, threads):
    first, again = run(threads), run(1)
    for a, b in zip(first, again):
        assert np.array_equal(a, b, equal_nan=True), "%r threads differ from 1" % (threads,)
    return first


# ---------------------------------------------------------------------------------------------------
# Shapes


def dims(min_size=1, max_size=6):
    return st.integers(min_size, max_size)


bn_shapes = st.tuples(dims(1, 5), dims(1, 6)).flatmap(
    lambda nc: st.lists(dims(1, 5), max_size=2).map(lambda spatial: nc + tuple(spatial)))
row_shapes = st.lists(dims(1, 7), min_size=1, max_size=4).map(tuple)
gn_shapes = st.tuples(dims(1, 3), dims(1, 4), dims(1, 3), st.lists(dims(1, 5), max_size=2)).map(
    lambda t: ((t[0], t[1] * t[2]) + tuple(t[3]), t[1]))  # (shape, num_groups)
in_shapes = st.tuples(dims(1, 3), dims(1, 5), st.lists(dims(1, 6), min_size=1, max_size=2)).map(
    lambda t: (t[0], t[1]) + tuple(t[2]))


# ---------------------------------------------------------------------------------------------------
# Batch normalization


def bn_rows(x, channel_axis):
    """x as float64 rows, one per channel."""
    x64 = np.moveaxis(np.asarray(x, dtype=np.float64), channel_axis, 0)
    return x64.reshape(x64.shape[0], -1)


def bn_unrows(rows, shape, channel_axis):
    moved = list(shape)
    moved.insert(0, moved.pop(channel_axis))
    return np.moveaxis(rows.reshape(moved), 0, channel_axis)


def check_batch_norm(d, kernel, channel_axis):
    rng = np.random.default_rng(d["seed"])
    shape = d["shape"] if channel_axis == 1 else (d["shape"][0],) + d["shape"][2:] + (d["shape"][1],)
    c = d["shape"][1]
    assume(kernel == "batch_norm" or math.prod(shape) // c >= 2)
    x = tensor(d, rng, shape)
    weight, bias = affine(d, rng, c)
    w = np.ones(c) if weight is None else weight
    b = np.zeros(c) if bias is None else bias
    x2 = bn_rows(x, channel_axis)
    dtype, eps, threads = d["dtype"], d["eps"], d["threads"]
    if kernel == "batch_norm":
        running_mean = d["magnitude"] * rng.standard_normal(c)
        running_var = d["magnitude"] ** 2 * rng.uniform(0.5, 2.0, c)
        invstd = 1.0 / np.sqrt(running_var + eps)
        y2 = (x2 - running_mean[:, None]) * (invstd * w)[:, None] + b[:, None]
        scale = np.abs((x2 - running_mean[:, None]) * (invstd * w)[:, None]).max(initial=0) + np.abs(b).max()
        y = same_bits_as_one_thread(lambda t: (foldnorm.batch_norm(
            x, running_mean, running_var, weight, bias, eps=eps, channel_axis=channel_axis, num_threads=t),),
            threads)
        assert_results(y, [("y", bn_unrows(y2, shape, channel_axis), scale, dtype)], dtype)
        return
    xhat, mean, invstd = rows_forward(x2, eps)
    if kernel == "batch_norm_train":
        got = same_bits_as_one_thread(lambda t: foldnorm.batch_norm_train(
            x, weight, bias, eps=eps, channel_axis=channel_axis, num_threads=t), threads)
        y2 = xhat * w[:, None] + b[:, None]
        scale = np.abs(xhat * w[:, None]).max(initial=0) + np.abs(b).max()
        assert_results(got, [("y", bn_unrows(y2, shape, channel_axis), scale, dtype),
                             ("mean", mean, np.abs(x2).max(), stats_dtype(dtype)),
                             ("invstd", invstd, invstd, stats_dtype(dtype))], dtype)
        return
    dy = tensor(dict(d, magnitude=1.0, offset=0.0), rng, shape)
    dy2 = bn_rows(dy, channel_axis)
    got = same_bits_as_one_thread(lambda t: foldnorm.batch_norm_backward(
        dy, x, mean, invstd, weight, channel_axis=channel_axis, num_threads=t), threads)
    dx2, dx_scale = rows_dx(dy2 * w[:, None], xhat, invstd)
    assert_results(got, [("dx", bn_unrows(dx2, shape, channel_axis), dx_scale, dtype),
                         ("dweight", (dy2 * xhat).sum(axis=1), largest_sum(dy2 * xhat, axis=1), dtype),
                         ("dbias", dy2.sum(axis=1), largest_sum(dy2, axis=1), dtype)], dtype)


# ---------------------------------------------------------------------------------------------------
# Layer and RMS normalization


def check_rows(d, kernel, axis):
    rng = np.random.default_rng(d["seed"])
    x = tensor(d, rng)
    shape = x.shape
    axis = axis % len(shape)
    k = math.prod(shape[axis:])
    x2 = np.asarray(x, dtype=np.float64).reshape(-1, k)
    centred = kernel.startswith("layer")
    weight, bias = affine(d, rng, shape[axis:])
    if not centred:
        bias = None
    w = np.ones(k) if weight is None else weight.reshape(k)
    b = np.zeros(k) if bias is None else bias.reshape(k)
    dtype, eps, threads = d["dtype"], d["eps"], d["threads"]
    xhat, mean, invstd = rows_forward(x2, eps, centred)
    stats_shape = shape[:axis] + (1,) * (len(shape) - axis)
    sd = stats_dtype(dtype)
    if not kernel.endswith("backward"):
        y2 = xhat * w + b
        scale = np.abs(xhat * w).max(initial=0) + np.abs(b).max()
        y = ("y", y2.reshape(shape), scale, dtype)
        istd = ("invstd", invstd.reshape(stats_shape), invstd.reshape(stats_shape), sd)
        if centred:
            got = same_bits_as_one_thread(lambda t: foldnorm.layer_norm(
                x, weight, bias, axis=axis, eps=eps, num_threads=t), threads)
            assert_results(got, [y, ("mean", mean.reshape(stats_shape), np.abs(x2).max(), sd), istd], dtype)
        else:
            got = same_bits_as_one_thread(lambda t: foldnorm.rms_norm(
                x, weight, axis=axis, eps=eps, num_threads=t), threads)
            assert_results(got, [y, istd], dtype)
        return
    dy = tensor(dict(d, magnitude=1.0, offset=0.0), rng)
    dy2 = np.asarray(dy, dtype=np.float64).reshape(-1, k)
    dx2, dx_scale = rows_dx(dy2 * w, xhat, invstd, centred)
    dx = ("dx", dx2.reshape(shape), dx_scale, dtype)
    dweight = ("dweight", (dy2 * xhat).sum(axis=0).reshape(shape[axis:]), largest_sum(dy2 * xhat, axis=0), dtype)
    if centred:
        got = same_bits_as_one_thread(lambda t: foldnorm.layer_norm_backward(
            dy, x, mean, invstd, weight, axis=axis, num_threads=t), threads)
        dbias = ("dbias", dy2.sum(axis=0).reshape(shape[axis:]), largest_sum(dy2, axis=0), dtype)
        assert_results(got, [dx, dweight, dbias], dtype)
    else:
        got = same_bits_as_one_thread(lambda t: foldnorm.rms_norm_backward(
            dy, x, invstd, weight, axis=axis, num_threads=t), threads)
        assert_results(got, [dx, dweight], dtype)


# ---------------------------------------------------------------------------------------------------
# Group and instance normalization


def check_groups(d, kernel, groups):
    rng = np.random.default_rng(d["seed"])
    x = tensor(d, rng)
    shape, c = x.shape, x.shape[1]
    weight, bias = affine(d, rng, c)
    w = np.ones(c) if weight is None else weight
    dtype, eps, threads = d["dtype"], d["eps"], d["threads"]
    x64 = np.asarray(x, dtype=np.float64)
    rows = x64.reshape(shape[0] * groups, -1)
    assume(np.all(rows.var(axis=1) + eps > 0))
    y_ref, mean, invstd = reference_group_norm(x64, groups, weight, bias, eps)
    instance = kernel.startswith("instance")
    sd = stats_dtype(dtype)
    if not kernel.endswith("backward"):
        xhat = (rows - mean.reshape(-1, 1)) * invstd.reshape(-1, 1)
        scale = (np.abs(xhat).max(initial=0) * np.abs(w).max()
                 + (0.0 if bias is None else np.abs(bias).max()))
        if instance:
            run = lambda t: foldnorm.instance_norm(x, weight, bias, eps=eps, num_threads=t)  # noqa: E731
        else:
            run = lambda t: foldnorm.group_norm(x, groups, weight, bias, eps=eps, num_threads=t)  # noqa: E731
        got = same_bits_as_one_thread(run, threads)
        assert_results(got, [("y", y_ref, scale, dtype), ("mean", mean, np.abs(x64).max(), sd),
                             ("invstd", invstd, invstd, sd)], dtype)
        return
    dy = tensor(dict(d, magnitude=1.0, offset=0.0), rng)
    dy64 = np.asarray(dy, dtype=np.float64)
    dx, dweight, dbias = reference_group_norm_backward(dy64, x64, groups, weight, eps)
    xhat = ((rows - mean.reshape(-1, 1)) * invstd.reshape(-1, 1)).reshape(shape)
    g2 = (dy64 * w.reshape((1, c) + (1,) * (len(shape) - 2))).reshape(shape[0] * groups, -1)
    _, dx_scale = rows_dx(g2, xhat.reshape(g2.shape), invstd.reshape(-1))
    sum_axes = (0,) + tuple(range(2, len(shape)))
    if instance:
        run = lambda t: foldnorm.instance_norm_backward(dy, x, mean, invstd, weight, num_threads=t)  # noqa: E731
    else:
        run = lambda t: foldnorm.group_norm_backward(dy, x, mean, invstd, groups, weight,  # noqa: E731
                                                     num_threads=t)
    got = same_bits_as_one_thread(run, threads)
    assert_results(got, [("dx", dx, dx_scale, dtype),
                         ("dweight", dweight, largest_sum(dy64 * xhat, axis=sum_axes), dtype),
                         ("dbias", dbias, largest_sum(dy64, axis=sum_axes), dtype)], dtype)


# ---------------------------------------------------------------------------------------------------
# The tests: one per kernel and magnitude band


def bands():
    return pytest.mark.parametrize("band", ["ordinary", "extreme_float64", "extreme_float32"])


@bands()
@pytest.mark.parametrize("kernel", ["batch_norm", "batch_norm_train", "batch_norm_backward"])
def test_batch_norm_family(kernel, band):
    @SETTINGS
    @given(draws(band, bn_shapes), st.sampled_from([1, -1]))
    def check(d, channel_axis):
        check_batch_norm(d, kernel, channel_axis)

    check()


@bands()
@pytest.mark.parametrize("kernel", ["layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward"])
def test_row_kernels(kernel, band):
    @SETTINGS
    @given(draws(band, row_shapes), st.integers(-4, 3))
    def check(d, axis):
        assume(-len(d["shape"]) <= axis < len(d["shape"]))
        check_rows(d, kernel, axis)

    check()


@bands()
@pytest.mark.parametrize("kernel", ["group_norm", "instance_norm", "group_norm_backward", "instance_norm_backward"])
def test_group_and_instance_kernels(kernel, band):
    shapes = in_shapes.map(lambda s: (s, s[1])) if kernel.startswith("instance_norm") else gn_shapes

    @SETTINGS
    @given(draws(band, shapes))
    def check(d):
        shape, groups = d["shape"]
        check_groups(dict(d, shape=shape), kernel, groups)

    check()


# ---------------------------------------------------------------------------------------------------
# Zero-sized inputs

EMPTY_CALLS = {
    "batch_norm": lambda x: foldnorm.batch_norm(x, np.zeros(x.shape[1]), np.ones(x.shape[1])),
    "batch_norm_train": lambda x: foldnorm.batch_norm_train(x),
    "batch_norm_backward": lambda x: foldnorm.batch_norm_backward(x, x, np.zeros(x.shape[1]),
                                                                  np.ones(x.shape[1])),
    "layer_norm": lambda x: foldnorm.layer_norm(x),
    "layer_norm_backward": lambda x: foldnorm.layer_norm_backward(x, x, np.zeros(x.shape[:-1]),
                                                                  np.ones(x.shape[:-1])),
    "rms_norm": lambda x: foldnorm.rms_norm(x),
    "rms_norm_backward": lambda x: foldnorm.rms_norm_backward(x, x, np.ones(x.shape[:-1])),
    "group_norm": lambda x: foldnorm.group_norm(x, 1),
    "group_norm_backward": lambda x: foldnorm.group_norm_backward(x, x, np.zeros((x.shape[0], 1)),
                                                                  np.ones((x.shape[0], 1)), 1),
    "instance_norm": lambda x: foldnorm.instance_norm(x),
    "instance_norm_backward": lambda x: foldnorm.instance_norm_backward(
        x, x, np.zeros(x.shape[:2]), np.ones(x.shape[:2])),
}


@pytest.mark.parametrize("kernel", sorted(EMPTY_CALLS))
def test_a_zero_sized_input_is_refused_naming_x(kernel):
    @settings(max_examples=25, deadline=None, derandomize=True, database=None)
    @given(st.lists(st.integers(0, 4), min_size=3, max_size=4).filter(lambda s: 0 in s),
           st.sampled_from([np.float16, np.float32, np.float64]))
    def check(shape, dtype):
        with pytest.raises(ValueError, match="^x must not be empty"):
            EMPTY_CALLS[kernel](np.zeros(shape, dtype))

    check()
