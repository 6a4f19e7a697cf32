"""The recycled memory behind every kernel's large results (foldnorm._outputs)."""
import numpy as np
import pytest

from foldnorm import (
    batch_norm,
    batch_norm_backward,
    batch_norm_train,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from foldnorm.kernels._outputs import _OutputCache, empty_result
from tests.kernels.kernel_refs import data

# (N, C, H, W): 4.5 MiB in float32, above the cache's 4 MiB threshold.
SHAPE = (8, 16, 96, 96)
CHANNELS, GROUPS = SHAPE[1], 4


def _full(shape, value):
    return np.full(shape, value, np.float32)


# kernel -> run(x, dy, k): the kernel's large result (y or dx), different for every k.
KERNELS = {
    "batch_norm": lambda x, dy, k: batch_norm(x, np.zeros(CHANNELS), np.ones(CHANNELS),
                                              bias=_full(CHANNELS, k)),
    "batch_norm channels-last": lambda x, dy, k: batch_norm(x, np.zeros(SHAPE[-1]), np.ones(SHAPE[-1]),
                                                            bias=_full(SHAPE[-1], k), channel_axis=-1),
    "batch_norm_train": lambda x, dy, k: batch_norm_train(x, bias=_full(CHANNELS, k))[0],
    "batch_norm_backward": lambda x, dy, k: batch_norm_backward(dy * (k + 1), x, *batch_norm_train(x)[1:])[0],
    "group_norm": lambda x, dy, k: group_norm(x, GROUPS, bias=_full(CHANNELS, k))[0],
    "group_norm_backward": lambda x, dy, k: group_norm_backward(dy * (k + 1), x, *group_norm(x, GROUPS)[1:],
                                                                GROUPS)[0],
    "instance_norm": lambda x, dy, k: instance_norm(x, bias=_full(CHANNELS, k))[0],
    "instance_norm_backward": lambda x, dy, k: instance_norm_backward(dy * (k + 1), x, *instance_norm(x)[1:])[0],
    "layer_norm": lambda x, dy, k: layer_norm(x, bias=_full(SHAPE[-1], k))[0],
    "layer_norm_backward": lambda x, dy, k: layer_norm_backward(dy * (k + 1), x, *layer_norm(x)[1:])[0],
    "rms_norm": lambda x, dy, k: rms_norm(x, _full(SHAPE[-1], k + 1))[0],
    "rms_norm_backward": lambda x, dy, k: rms_norm_backward(dy * (k + 1), x, rms_norm(x)[1])[0],
}


def _address(a):
    return a.__array_interface__["data"][0]


def _is_recycled(a):
    """Whether a is (a view of) a cache slab's lease rather than of memory NumPy allocated for it."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a.base is not None


def _held(a, k):
    """What the caller keeps of result k: the result itself, or only a strided view of it."""
    return a if k % 2 == 0 else a[::3, 1:]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_results_held_by_the_caller_are_never_reused(kernel):
    """Large results come from recycled memory: what the caller still holds must stay intact while the
    same kernel keeps producing results of the same size, some of them released at once."""
    run = KERNELS[kernel]
    x = data(SHAPE, np.float32)
    dy = data(SHAPE, np.float32, seed=1, loc=0.0, scale=1.0)
    held, copies = [], []
    for k in range(4):
        result = run(x, dy, k)
        assert result.shape == SHAPE and result.dtype == np.float32
        assert result.nbytes >= _OutputCache.MIN_BYTES
        assert result.flags.writeable and result.flags.c_contiguous and _is_recycled(result)
        result[0, 0, 0, 0] = -1000.0
        copies.append(_held(result, k).copy())
        held.append(_held(result, k))
        del result
        run(x, dy, k + 10)
    assert not np.array_equal(copies[0], copies[2]) and not np.array_equal(copies[1], copies[3])
    for k, (kept, copy) in enumerate(zip(held, copies)):
        np.testing.assert_array_equal(kept, copy, err_msg="result %d changed" % k)
    assert held[0][0, 0, 0, 0] == held[2][0, 0, 0, 0] == -1000.0


def test_an_idle_slab_is_reused_once_released_and_not_while_a_view_is_alive():
    cache = _OutputCache()
    shape = (1024, 1024)
    pattern = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    first = cache.empty(shape, np.float32)
    first[...] = pattern
    released = _address(first)
    view = first[10:20, ::2]
    del first
    while_viewed = cache.empty(shape, np.float32)
    assert _address(while_viewed) != released
    np.testing.assert_array_equal(view, pattern[10:20, ::2])
    del view
    after = cache.empty(shape, np.float32)
    assert _address(after) == released
    # The same slab, kept while idle: its contents are those the first result left there.
    np.testing.assert_array_equal(after, pattern)
    assert after.flags.writeable and after.flags.c_contiguous and after.flags.aligned


def test_a_slab_is_reused_only_for_a_request_of_its_size():
    cache = _OutputCache()
    first = cache.empty((1024, 1024), np.float32)
    released = _address(first)
    del first
    larger = cache.empty((1025, 1024), np.float32)
    assert _address(larger) != released
    same_bytes = cache.empty((512, 1024), np.float64)
    assert _address(same_bytes) == released
    assert same_bytes.dtype == np.float64 and same_bytes.shape == (512, 1024)


@pytest.mark.parametrize("shape,dtype,recycled", [((1024, 1023), np.float32, False),
                                                  ((1024, 1024), np.float32, True),
                                                  ((3, 700, 1000), np.float16, True),
                                                  ((7,), np.float64, False)])
def test_empty_result_recycles_only_results_of_4_mib_or_more(shape, dtype, recycled):
    a = empty_result(shape, dtype)
    assert a.shape == shape and a.dtype == dtype
    assert a.flags.writeable and a.flags.c_contiguous
    assert _is_recycled(a) == recycled
