"""Batch, group and instance normalization with a fused activation (relu, silu), forward and backward,
against float64 NumPy references and torch autograd."""
import numpy as np
import pytest

import foldnorm
from foldnorm.kernels import (
    batch_norm,
    batch_norm_backward,
    batch_norm_train,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
)
from tests.kernels.kernel_refs import (
    assert_backward_matches,
    assert_bit_identical_across_threads,
    assert_close,
    make_inputs,
    reference_group_norm,
    reference_group_norm_backward,
)

ACTIVATIONS = ["relu", "silu"]
KERNEL_DTYPES = [np.float32, np.float64]
# (shape, channel_axis): planes (one piece and many), channels-last rows, a single channel.
BN_CASES = [((4, 3, 5, 7), 1), ((2, 8, 3000), 1), ((16, 24), 1), ((6, 5, 7, 40), -1), ((300, 1), -1),
            ((3, 1, 4100), 1)]
# (shape, groups): whole blocks per unit, chunked planes (few blocks), one group.
GN_CASES = [((4, 6, 5, 5), 3), ((1, 4, 9000), 2), ((2, 8, 33, 33), 8), ((40, 4, 3, 3), 2), ((2, 6, 7), 1)]


def act64(v, activation):
    if activation is None:
        return v
    if activation == "relu":
        return np.maximum(v, 0.0)
    return v / (1.0 + np.exp(-v))


def act_grad64(v, activation):
    if activation is None:
        return np.ones_like(v)
    if activation == "relu":
        return (v > 0).astype(np.float64)
    s = 1.0 / (1.0 + np.exp(-v))
    return s * (1.0 + v * (1.0 - s))


def _bn_view(x, channel_axis):
    """x as (N, C, rest) in float64 for the references."""
    x = np.asarray(x, np.float64)
    if channel_axis == -1:
        x = np.moveaxis(x, -1, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _bn_unview(a, shape, channel_axis):
    if channel_axis == -1:
        moved = (shape[0], shape[-1]) + tuple(shape[1:-1])
        return np.moveaxis(a.reshape(moved), 1, -1)
    return a.reshape(shape)


def ref_bn_train(x, weight, bias, activation, channel_axis, eps=1e-5):
    """(pre-activation, y, mean, invstd) in float64."""
    v = _bn_view(x, channel_axis)
    mean = v.mean(axis=(0, 2))
    invstd = 1.0 / np.sqrt(v.var(axis=(0, 2)) + eps)
    pre = (v - mean[None, :, None]) * invstd[None, :, None] * weight[None, :, None] + bias[None, :, None]
    return (_bn_unview(pre, x.shape, channel_axis), _bn_unview(act64(pre, activation), x.shape, channel_axis),
            mean, invstd)


def ref_bn_backward(dy, x, weight, bias, activation, channel_axis, eps=1e-5):
    """Analytic (dx, dweight, dbias) of act(batch_norm_train(x)) in float64."""
    v = _bn_view(x, channel_axis)
    pre, _, mean, invstd = ref_bn_train(x, weight, bias, activation, channel_axis, eps)
    g = _bn_view(dy, channel_axis) * act_grad64(_bn_view(pre, channel_axis), activation)
    xhat = (v - mean[None, :, None]) * invstd[None, :, None]
    n = v.shape[0] * v.shape[2]
    dbias = g.sum(axis=(0, 2))
    dweight = (g * xhat).sum(axis=(0, 2))
    dx = (weight * invstd)[None, :, None] * (g - dbias[None, :, None] / n - xhat * dweight[None, :, None] / n)
    return _bn_unview(dx, x.shape, channel_axis), dweight, dbias


def bn_inputs(shape, channel_axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1] if channel_axis == 1 else shape[-1]
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    weight = rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c)
    bias = rng.standard_normal(c) * 0.5
    dy = rng.standard_normal(shape).astype(dtype)
    return x, weight, bias, dy


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,channel_axis", BN_CASES)
def test_batch_norm_train_and_backward(shape, channel_axis, activation, dtype):
    x, weight, bias, dy = bn_inputs(shape, channel_axis, dtype)
    y, mean, invstd = batch_norm_train(x, weight, bias, channel_axis=channel_axis, activation=activation)
    _, y_ref, mean_ref, invstd_ref = ref_bn_train(x, weight, bias, activation, channel_axis)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype)
    grads = batch_norm_backward(dy, x, mean, invstd, weight, bias=bias, activation=activation,
                                channel_axis=channel_axis)
    assert_backward_matches(grads, ref_bn_backward(dy, x, weight, bias, activation, channel_axis), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,channel_axis", BN_CASES[:4])
def test_batch_norm_inference(shape, channel_axis, activation, dtype):
    x, weight, bias, _ = bn_inputs(shape, channel_axis, dtype)
    c = weight.size
    running_mean, running_var = np.linspace(-0.5, 0.5, c), np.linspace(0.5, 2.0, c)
    y = batch_norm(x, running_mean, running_var, weight, bias, channel_axis=channel_axis, activation=activation)
    v = _bn_view(x, channel_axis)
    pre = ((v - running_mean[None, :, None]) / np.sqrt(running_var[None, :, None] + 1e-5) * weight[None, :, None]
           + bias[None, :, None])
    assert_close(y, _bn_unview(act64(pre, activation), x.shape, channel_axis), dtype)
    out = np.empty_like(x)
    assert batch_norm(x, running_mean, running_var, weight, bias, channel_axis=channel_axis,
                      activation=activation, out=out) is out
    assert np.array_equal(out, y)


def test_activation_none_is_the_plain_kernel():
    x, weight, bias, dy = bn_inputs((4, 3, 5, 7), 1, np.float32)
    plain = batch_norm_train(x, weight, bias)
    assert all(np.array_equal(a, b) for a, b in zip(plain, batch_norm_train(x, weight, bias, activation=None)))
    y, mean, invstd = plain
    # Without an activation the bias is not read.
    a = batch_norm_backward(dy, x, mean, invstd, weight)
    b = batch_norm_backward(dy, x, mean, invstd, weight, bias=bias * 100)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,groups", GN_CASES)
def test_group_norm_forward_and_backward(shape, groups, activation, dtype):
    x, weight, bias = make_inputs(shape, dtype, seed=4)
    weight, bias = weight.astype(np.float64), bias.astype(np.float64)
    dy = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    y, mean, invstd = group_norm(x, groups, weight, bias, activation=activation)
    pre, _, _ = reference_group_norm(x, groups, weight, bias)
    assert_close(y, act64(pre, activation), dtype)
    grads = group_norm_backward(dy, x, mean, invstd, groups, weight, bias=bias, activation=activation)
    g = dy.astype(np.float64) * act_grad64(pre, activation)
    assert_backward_matches(grads, reference_group_norm_backward(g, x, groups, weight), dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_instance_norm_forward_and_backward(activation):
    x, weight, bias = make_inputs((3, 5, 6, 7), np.float64, seed=6)
    dy = np.random.default_rng(7).standard_normal(x.shape)
    y, mean, invstd = instance_norm(x, weight, bias, activation=activation)
    pre, _, _ = reference_group_norm(x, 5, weight, bias)
    assert_close(y, act64(pre, activation), np.float64)
    grads = instance_norm_backward(dy, x, mean, invstd, weight, bias=bias, activation=activation)
    assert_backward_matches(grads, reference_group_norm_backward(dy * act_grad64(pre, activation), x, 5, weight),
                            np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, *ACTIVATIONS])
@pytest.mark.parametrize("batch", [3, 30])
def test_backward_a_channel_at_a_time_gives_the_two_passes_bits(batch, activation, dtype):
    # 6 channels: one thread takes whole channels (its cache holds a channel's g for the small batch, not for
    # the large one), two threads and more run the two passes over (n, channel, piece) units.
    x, weight, bias, dy = bn_inputs((batch, 6, 47, 53), 1, dtype)

    def run(threads):
        _, mean, invstd = batch_norm_train(x, weight, bias, num_threads=1)
        return batch_norm_backward(dy, x, mean, invstd, weight, bias=bias, activation=activation,
                                   num_threads=threads)

    assert_bit_identical_across_threads(run, [1, 2, 4])
    assert_backward_matches(run(1), ref_bn_backward(dy, x, weight, bias, activation, 1), dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bit_identical_across_thread_counts(activation):
    x, weight, bias, dy = bn_inputs((8, 16, 64, 65), 1, np.float32)
    xl, _, _, dyl = bn_inputs((64, 33, 70, 16), -1, np.float32)

    def run(threads):
        y, mean, invstd = batch_norm_train(x, weight, bias, activation=activation, num_threads=threads)
        grads = batch_norm_backward(dy, x, mean, invstd, weight, bias=bias, activation=activation,
                                    num_threads=threads)
        yl, meanl, invstdl = batch_norm_train(xl, weight, bias, channel_axis=-1, activation=activation,
                                              num_threads=threads)
        gradsl = batch_norm_backward(dyl, xl, meanl, invstdl, weight, bias=bias, activation=activation,
                                     channel_axis=-1, num_threads=threads)
        gy, gm, gi = group_norm(x, 4, weight, bias, activation=activation, num_threads=threads)
        ggrads = group_norm_backward(dy, x, gm, gi, 4, weight, bias=bias, activation=activation,
                                     num_threads=threads)
        return (y, *grads, yl, *gradsl, gy, *ggrads)

    assert_bit_identical_across_threads(run, [1, 2, 3, 4])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_torch_autograd(activation):
    torch = pytest.importorskip("torch")
    x, weight, bias, dy = bn_inputs((4, 6, 9, 11), 1, np.float64)
    act = torch.relu if activation == "relu" else torch.nn.functional.silu
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(weight, requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    yt = act(torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5))
    yt.backward(torch.tensor(dy))
    y, mean, invstd = batch_norm_train(x, weight, bias, activation=activation)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    dx, dweight, dbias = batch_norm_backward(dy, x, mean, invstd, weight, bias=bias, activation=activation)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dweight, wt.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dbias, bt.grad.numpy(), rtol=1e-9, atol=1e-10)

    for xt_grad in (xt, wt, bt):
        xt_grad.grad = None
    gy = act(torch.nn.functional.group_norm(xt, 3, wt, bt, eps=1e-5))
    gy.backward(torch.tensor(dy))
    y, mean, invstd = group_norm(x, 3, weight, bias, activation=activation)
    np.testing.assert_allclose(y, gy.detach().numpy(), rtol=1e-10, atol=1e-12)
    dx, dweight, dbias = group_norm_backward(dy, x, mean, invstd, 3, weight, bias=bias, activation=activation)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dweight, wt.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dbias, bt.grad.numpy(), rtol=1e-9, atol=1e-10)


def test_float16_is_computed_in_float32():
    x, weight, bias, dy = bn_inputs((4, 3, 5, 7), 1, np.float16)
    y, mean, invstd = batch_norm_train(x, weight, bias, activation="silu")
    assert y.dtype == np.float16
    _, y_ref, _, _ = ref_bn_train(x, weight, bias, "silu", 1)
    assert_close(y, y_ref, np.float16)


@pytest.mark.parametrize("activation,error", [("gelu", ValueError), ("RELU", ValueError), (1, TypeError),
                                              (True, TypeError), (b"relu", TypeError)])
def test_bad_activation_is_named(activation, error):
    x = np.ones((2, 3, 4), np.float32)
    stats = np.zeros(3), np.ones(3)
    calls = [lambda: batch_norm(x, *stats, activation=activation),
             lambda: batch_norm_train(x, activation=activation),
             lambda: batch_norm_backward(x, x, *stats, activation=activation),
             lambda: group_norm(x, 3, activation=activation),
             lambda: group_norm_backward(x, x, np.zeros((2, 3)), np.ones((2, 3)), 3, activation=activation),
             lambda: instance_norm(x, activation=activation)]
    for call in calls:
        with pytest.raises(error, match="activation must be None, 'relu' or 'silu'"):
            call()


def test_bias_of_the_backward_is_checked():
    x = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="bias must have shape"):
        batch_norm_backward(x, x, np.zeros(3), np.ones(3), bias=np.zeros(4), activation="relu")
    with pytest.raises(ValueError, match="bias must have shape"):
        group_norm_backward(x, x, np.zeros((2, 3)), np.ones((2, 3)), 3, bias=np.zeros(2), activation="relu")


def test_exported_at_the_top_level():
    assert foldnorm.batch_norm is batch_norm and foldnorm.group_norm_backward is group_norm_backward
