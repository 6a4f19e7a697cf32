"""add_layer_norm and add_rms_norm (s = x + residual, then the norm of s), their backward passes and their
in-place rules, against float64 NumPy references and torch autograd."""
import numpy as np
import pytest

import foldnorm
from foldnorm.kernels import (
    add_layer_norm,
    add_layer_norm_backward,
    add_rms_norm,
    add_rms_norm_backward,
    layer_norm,
    rms_norm,
)
from tests.kernels.kernel_refs import ROW_CASES, assert_bit_identical_across_threads, assert_rows_close, data, params
from tests.kernels.test_layer_norm import ref_layer_norm, ref_layer_norm_backward
from tests.kernels.test_rms_norm import ref_rms_norm, ref_rms_norm_backward

KERNEL_DTYPES = [np.float32, np.float64]
CASES = [c for c in ROW_CASES if len(c[0]) <= 3]


def inputs(shape, axis, dtype):
    x = data(shape, dtype, seed=0, loc=1.0)
    residual = data(shape, dtype, seed=9, loc=2.0)
    weight, bias = params(x.shape[axis:], dtype)
    return x, residual, weight.astype(np.float64), bias.astype(np.float64)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES)
def test_add_layer_norm(shape, axis, dtype):
    x, residual, weight, bias = inputs(shape, axis, dtype)
    y, s, mean, invstd = add_layer_norm(x, residual, weight, bias, axis=axis)
    assert y.dtype == s.dtype == dtype and s.shape == y.shape == x.shape
    np.testing.assert_array_equal(s, x + residual)
    y_ref, mean_ref, invstd_ref = ref_layer_norm(s.astype(np.float64), weight, bias, axis)
    assert_rows_close(y, y_ref, dtype)
    assert mean.shape == mean_ref.shape
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6)
    # Exactly layer_norm of the s it returns.
    plain = layer_norm(s, weight, bias, axis=axis)
    assert np.array_equal(plain[0], y) and np.array_equal(plain[1], mean) and np.array_equal(plain[2], invstd)
    dy = data(shape, dtype, seed=3, loc=0.0, scale=1.0)
    ds = data(shape, dtype, seed=4, loc=0.0, scale=1.0)
    dx, dweight, dbias = add_layer_norm_backward(dy, ds, s, mean, invstd, weight, axis=axis)
    dx_ref, dweight_ref, dbias_ref = ref_layer_norm_backward(dy, s, weight, axis)
    assert dx.dtype == dtype and dweight.shape == x.shape[axis % x.ndim:]
    assert_rows_close(dx, dx_ref + ds.astype(np.float64), dtype, scale=4)
    count = max(1, x.size // dweight.size)
    assert_rows_close(dweight, dweight_ref, dtype, scale=np.sqrt(count) * 4)
    assert_rows_close(dbias, dbias_ref, dtype, scale=np.sqrt(count) * 4)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES)
def test_add_rms_norm(shape, axis, dtype):
    x, residual, weight, _ = inputs(shape, axis, dtype)
    y, s, invrms = add_rms_norm(x, residual, weight, axis=axis)
    np.testing.assert_array_equal(s, x + residual)
    y_ref, invrms_ref = ref_rms_norm(s, weight, axis)
    assert_rows_close(y, y_ref, dtype)
    np.testing.assert_allclose(invrms, invrms_ref, rtol=1e-6)
    plain = rms_norm(s, weight, axis=axis)
    assert np.array_equal(plain[0], y) and np.array_equal(plain[1], invrms)
    dy = data(shape, dtype, seed=3, loc=0.0, scale=1.0)
    ds = data(shape, dtype, seed=4, loc=0.0, scale=1.0)
    dx, dweight = add_rms_norm_backward(dy, ds, s, invrms, weight, axis=axis)
    dx_ref, dweight_ref = ref_rms_norm_backward(dy, s, weight, axis)
    assert_rows_close(dx, dx_ref + ds.astype(np.float64), dtype, scale=4)
    count = max(1, x.size // dweight.size)
    assert_rows_close(dweight, dweight_ref, dtype, scale=np.sqrt(count) * 4)


@pytest.mark.parametrize("shape", [(64, 96), (3, 70001)], ids=["rows", "wide-rows"])
@pytest.mark.parametrize("layout", ["y-into-x-s-into-residual", "y-into-residual-s-into-x", "s-into-x",
                                    "s-into-residual", "y-into-x", "x-is-residual"])
def test_in_place_updates_of_the_residual_stream(layout, shape):
    x, residual, weight, bias = inputs(shape, -1, np.float32)
    y_ref, s_ref, mean_ref, invstd_ref = add_layer_norm(x, residual, weight, bias)
    rms_ref = add_rms_norm(x, residual, weight)
    for kernel, expected, args in ((add_layer_norm, (y_ref, s_ref), (weight, bias)), (add_rms_norm, rms_ref[:2], (weight,))):
        a, b = x.copy(), residual.copy()
        if layout == "x-is-residual":
            b = a
            expected = kernel(x, x.copy(), *args)[:2]
        targets = {"y-into-x-s-into-residual": dict(out=a, s_out=b), "y-into-residual-s-into-x": dict(out=b, s_out=a),
                   "s-into-x": dict(s_out=a), "s-into-residual": dict(s_out=b), "y-into-x": dict(out=a),
                   "x-is-residual": dict(s_out=a)}[layout]
        result = kernel(a, b, *args, **targets)
        assert np.array_equal(result[0], expected[0]) and np.array_equal(result[1], expected[1])
        if "out" in targets:
            assert result[0] is targets["out"]
        if "s_out" in targets:
            assert result[1] is targets["s_out"]


def test_overlaps_that_would_be_wrong_are_refused():
    x, residual, weight, bias = inputs((8, 16), -1, np.float32)
    buffer = np.zeros((9, 16), np.float32)
    buffer[:8] = x
    shifted = buffer[1:]
    with pytest.raises(ValueError, match="s_out must not overlap out"):
        add_layer_norm(x, residual, out=x, s_out=x)
    with pytest.raises(ValueError, match="s_out must be x itself or share no memory with it"):
        add_layer_norm(buffer[:8], residual, s_out=shifted)
    with pytest.raises(ValueError, match="out must be residual itself or share no memory with it"):
        add_rms_norm(x, buffer[:8], out=shifted)
    # A y or s written over a parameter would change it before every row has read it.
    w = np.ones((1, 128), np.float32)
    with pytest.raises(ValueError, match="out must not overlap weight"):
        add_rms_norm(x.reshape(1, 128), residual.reshape(1, 128), w[0], out=w)
    with pytest.raises(ValueError, match="s_out must not overlap bias"):
        stream = np.zeros(x.shape, np.float32)
        add_layer_norm(x, residual, weight, stream[0], s_out=stream)


def test_outputs_are_checked():
    x, residual, _, _ = inputs((4, 8), -1, np.float32)
    with pytest.raises(ValueError, match="residual must have shape"):
        add_layer_norm(x, residual[:, :4])
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        add_rms_norm(x, residual.astype(np.float64))
    with pytest.raises(TypeError, match="s_out must have dtype float32"):
        add_rms_norm(x, residual, s_out=np.empty((4, 8)))
    with pytest.raises(ValueError, match="out must have shape"):
        add_layer_norm(x, residual, out=np.empty((4, 9), np.float32))
    with pytest.raises(ValueError, match="s_out must be writable"):
        readonly = np.empty((4, 8), np.float32)
        readonly.flags.writeable = False
        add_layer_norm(x, residual, s_out=readonly)
    with pytest.raises(ValueError, match="ds must have shape"):
        add_rms_norm_backward(x, x[:2], x, np.ones(4))
    with pytest.raises(ValueError, match="invstd must hold one value per normalized row"):
        add_layer_norm_backward(x, x, x, np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match="eps must be"):
        add_layer_norm(x, residual, eps=-1.0)


def test_non_contiguous_and_float16_outputs_are_filled():
    x, residual, weight, bias = inputs((6, 10), -1, np.float32)
    y_ref, s_ref, _, _ = add_layer_norm(x, residual, weight, bias)
    out = np.empty((6, 20), np.float32)[:, ::2]
    s_out = np.empty((6, 10), np.float32, order="F")
    y, s, _, _ = add_layer_norm(x, residual, weight, bias, out=out, s_out=s_out)
    assert y is out and s is s_out
    assert np.array_equal(out, y_ref) and np.array_equal(s_out, s_ref)
    h, hr = x.astype(np.float16), residual.astype(np.float16)
    y16, s16, _ = add_rms_norm(h, hr, weight, out=h, s_out=hr)
    assert y16 is h and s16 is hr and h.dtype == np.float16
    np.testing.assert_allclose(hr, (x.astype(np.float16) + residual.astype(np.float16)).astype(np.float32),
                               rtol=1e-3)


def test_bit_identical_across_thread_counts():
    x, residual, weight, bias = inputs((512, 768), -1, np.float32)
    xw, rw, ww, bw = inputs((4, 70001), -1, np.float32)
    dy = data(x.shape, np.float32, seed=3, loc=0.0)
    dyw = data(xw.shape, np.float32, seed=3, loc=0.0)

    def run(threads):
        out = []
        for a, b, w, c, g in ((x, residual, weight, bias, dy), (xw, rw, ww, bw, dyw)):
            y, s, mean, invstd = add_layer_norm(a, b, w, c, num_threads=threads)
            out += [y, s, mean, invstd, *add_layer_norm_backward(g, a, s, mean, invstd, w, num_threads=threads)]
            y, s, invrms = add_rms_norm(a, b, w, num_threads=threads)
            out += [y, s, invrms, *add_rms_norm_backward(g, a, s, invrms, w, num_threads=threads)]
        return out

    assert_bit_identical_across_threads(run, [1, 2, 3, 4])


def test_gradients_match_torch_autograd():
    torch = pytest.importorskip("torch")
    x, residual, weight, bias = inputs((5, 3, 16), -1, np.float64)
    dy = data(x.shape, np.float64, seed=3, loc=0.0)
    ds = data(x.shape, np.float64, seed=4, loc=0.0)
    xt, rt = torch.tensor(x, requires_grad=True), torch.tensor(residual, requires_grad=True)
    wt, bt = torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True)
    st = xt + rt
    yt = torch.nn.functional.layer_norm(st, (16,), wt, bt, eps=1e-5)
    torch.autograd.backward([yt, st], [torch.tensor(dy), torch.tensor(ds)])
    y, s, mean, invstd = add_layer_norm(x, residual, weight, bias)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    dx, dweight, dbias = add_layer_norm_backward(dy, ds, s, mean, invstd, weight)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dx, rt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dweight, wt.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dbias, bt.grad.numpy(), rtol=1e-9, atol=1e-10)

    xt.grad = rt.grad = wt.grad = None
    st = xt + rt
    yt = st * torch.rsqrt((st * st).mean(-1, keepdim=True) + 1e-5) * wt
    torch.autograd.backward([yt, st], [torch.tensor(dy), torch.tensor(ds)])
    y, s, invrms = add_rms_norm(x, residual, weight)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    dx, dweight = add_rms_norm_backward(dy, ds, s, invrms, weight)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dweight, wt.grad.numpy(), rtol=1e-9, atol=1e-10)


def test_exported_at_the_top_level():
    assert foldnorm.add_layer_norm is add_layer_norm and foldnorm.add_rms_norm_backward is add_rms_norm_backward


@pytest.mark.parametrize("in_place", [False, True])
def test_outputs_of_32_mib_or_more_together_are_streamed_correctly(in_place):
    x, residual, weight, bias = inputs((4200, 1003), -1, np.float32)
    s_ref = x + residual
    y_ref = layer_norm(s_ref, weight, bias)[0]
    rms_ref = rms_norm(s_ref, weight)[0]
    a, b = x.copy(), residual.copy()
    targets = dict(out=a, s_out=b) if in_place else {}
    y, s, _, _ = add_layer_norm(a, b, weight, bias, **targets)
    assert np.array_equal(y, y_ref) and np.array_equal(s, s_ref)
    a, b = x.copy(), residual.copy()
    targets = dict(out=b, s_out=a) if in_place else {}
    y, s, _ = add_rms_norm(a, b, weight, **targets)
    assert np.array_equal(y, rms_ref) and np.array_equal(s, s_ref)
