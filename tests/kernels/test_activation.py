"""The kernels' vector exp, SiLU and ReLU (fn_activation.h) against float64 NumPy, value by value."""
import numpy as np
import pytest

from foldnorm.kernels import _runtime
from foldnorm.kernels._validation import ACTIVATIONS

F32_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)


def kernel_exp(x):
    y = np.empty_like(x)
    _runtime.exp_values(x, y)
    return y


def ulp_error(actual, x, dtype):
    """|actual - exp(x)| in units of the last place of exp(x) rounded to dtype (exp in float64)."""
    with np.errstate(over="ignore"):
        exact = np.exp(x.astype(np.float64))
        rounded = exact.astype(dtype)
    spacing = np.spacing(np.abs(rounded)).astype(np.float64)
    spacing = np.maximum(spacing, float(np.finfo(dtype).smallest_subnormal))
    with np.errstate(invalid="ignore"):
        err = np.abs(actual.astype(np.float64) - exact) / spacing
    both_inf = np.isinf(rounded) & (actual == rounded)
    return np.where(both_inf, 0.0, err)


def dense_float32_sweep(step=97):
    """Every step-th float32 bit pattern whose exp is neither 0 nor inf, both signs: a dense sweep of every
    exponent of the inputs exp takes."""
    bits = np.arange(0, 1 << 31, step, dtype=np.uint32)
    values = np.concatenate([bits, bits | np.uint32(1 << 31)]).view(np.float32)
    with np.errstate(over="ignore"):
        keep = np.isfinite(values) & (values < 89) & (values > -104)
    return values[keep]


def test_float32_exp_within_two_ulp_over_a_dense_sweep():
    x = dense_float32_sweep()
    assert x.size > 2_000_000
    err = ulp_error(kernel_exp(x), x, np.float32)
    assert err.max() <= 2.0, "worst %g ulp at x = %r" % (err.max(), x[np.argmax(err)])


def test_float64_exp_within_two_ulp():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(-746, 710, 2_000_000), rng.uniform(-1, 1, 200_000),
                        np.linspace(-745.2, -708, 100_001), np.linspace(700, 709.79, 10_001)])
    err = ulp_error(kernel_exp(x), x, np.float64)
    assert err.max() <= 2.0, "worst %g ulp at x = %r" % (err.max(), x[np.argmax(err)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_exp_edges(dtype):
    info = np.finfo(dtype)
    edges = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, info.tiny, -info.tiny, info.smallest_subnormal,
                      np.log(info.max), np.nextafter(np.log(info.max), np.inf, dtype=dtype) * 1.0001,
                      np.log(info.tiny), np.log(float(info.smallest_subnormal)), -1e4, 1e4, info.max,
                      -info.max], dtype=dtype)
    got = kernel_exp(edges)
    with np.errstate(over="ignore"):
        want = np.exp(edges.astype(np.float64)).astype(dtype)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    assert np.all(ulp_error(got[finite], edges[finite], dtype) <= 2.0)
    assert got[0] == 0 and got[1] == np.inf
    # Underflow: the denormal results keep their value, and below half the smallest denormal exp is 0.
    x = np.linspace(np.log(float(info.tiny)), np.log(float(info.smallest_subnormal)) - 1, 20001).astype(dtype)
    assert np.all(ulp_error(kernel_exp(x), x, dtype) <= 2.0)


def test_exp_does_not_depend_on_alignment_or_tail():
    x = dense_float32_sweep(step=4099)[:20011]
    whole = kernel_exp(x)
    for offset in range(1, 9):
        for length in (1, 3, 7, 16, 1023, 1025, 4097):
            part = x[offset:offset + length].copy()
            buffer = np.empty(part.size + 1, np.float32)[1:]  # misaligned by 4 bytes
            buffer[...] = part
            out = np.empty_like(buffer)
            _runtime.exp_values(buffer, out)
            assert np.array_equal(out, whole[offset:offset + length])


def silu64(v):
    v = v.astype(np.float64)
    with np.errstate(over="ignore"):
        return v / (1.0 + np.exp(-v))


def silu_grad64(v):
    v = v.astype(np.float64)
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-v))
    return s * (1.0 + v * (1.0 - s))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_silu_and_its_gradient_match_float64(dtype):
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.standard_normal(100_000) * 4, rng.uniform(-120, 100, 100_000),
                        np.linspace(-30, 30, 10001)]).astype(dtype)
    y = np.empty_like(v)
    _runtime.activate_values(v, y, ACTIVATIONS["silu"])
    ref = silu64(v)
    # Relative to the value, whose tiny negative tail (x near -100) keeps its digits down to the denormals;
    # past the point where exp(x) itself rounds to 0, x * exp(x) is a few hundred denormal steps at most.
    eps = np.finfo(dtype).eps
    tiny = float(np.finfo(dtype).smallest_subnormal)
    assert np.all(np.abs(y - ref) <= 4 * eps * np.abs(ref) + 1024 * tiny)
    dy = rng.standard_normal(v.size).astype(dtype)
    g = np.empty_like(v)
    _runtime.activation_grad_values(dy, v, g, ACTIVATIONS["silu"])
    ref_g = dy.astype(np.float64) * silu_grad64(v)
    # The derivative crosses zero near x = -1.28: there its error is relative to its terms, of order 1.
    np.testing.assert_allclose(g, ref_g, rtol=8 * eps, atol=8 * eps * np.abs(dy).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_activation_edges(dtype):
    v = np.array([-np.inf, np.inf, np.nan, -0.0, 0.0, -1e30, 1e30], dtype=dtype)
    silu = np.empty_like(v)
    _runtime.activate_values(v, silu, ACTIVATIONS["silu"])
    np.testing.assert_array_equal(silu, np.array([0.0, np.inf, np.nan, 0.0, 0.0, 0.0, 1e30], dtype=dtype))
    relu = np.empty_like(v)
    _runtime.activate_values(v, relu, ACTIVATIONS["relu"])
    np.testing.assert_array_equal(relu, np.array([0.0, np.inf, np.nan, 0.0, 0.0, 0.0, 1e30], dtype=dtype))
    dy = np.full_like(v, 2.0)
    grad = np.empty_like(v)
    _runtime.activation_grad_values(dy, v, grad, ACTIVATIONS["silu"])
    np.testing.assert_array_equal(grad, np.array([0.0, 2.0, np.nan, 1.0, 1.0, 0.0, 2.0], dtype=dtype))
    _runtime.activation_grad_values(dy, v, grad, ACTIVATIONS["relu"])
    np.testing.assert_array_equal(grad, np.array([0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 2.0], dtype=dtype))


def test_silu_matches_torch_where_installed():
    torch = pytest.importorskip("torch")
    v = np.random.default_rng(3).standard_normal(50_000).astype(np.float32) * 6
    y = np.empty_like(v)
    _runtime.activate_values(v, y, ACTIVATIONS["silu"])
    np.testing.assert_allclose(y, torch.nn.functional.silu(torch.from_numpy(v)).numpy(), rtol=4e-7, atol=1e-7)
