"""The cases the multi-process tests run: data every rank regenerates from a seed, how the batch is split
over the ranks, and the float64 NumPy reference of batch norm on the whole batch.

Imported by the tests and by the worker script that mpiexec (or the gloo launcher) starts on every rank.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np

EPS = 1e-5
MOMENTUM = 0.3


@dataclass(frozen=True)
class Case:
    name: str
    sample_shape: Tuple[int, ...]  # one sample's shape: (C, *spatial), or (*spatial, C) channels last
    channel_axis: int
    dtype: str
    offset: float = 0.0  # added to x: data far from zero
    single_rows: bool = False  # one sample per rank: ranks with one value per channel

    @property
    def channels(self):
        return self.sample_shape[0] if self.channel_axis == 1 else self.sample_shape[-1]

    def shards(self, world):
        """Samples per rank: uneven, with an empty shard wherever there are 2 or more ranks."""
        if self.single_rows:
            return [1] * world if world > 1 else [2]
        return {1: [7], 2: [0, 7], 3: [4, 0, 3]}.get(world, [3] * world)

    def data(self, world):
        """(x, dy, weight, bias, running_mean, running_var) of the whole batch, in the case's dtype."""
        rng = np.random.default_rng(sum(map(ord, self.name)) + world)
        shape = (sum(self.shards(world)),) + self.sample_shape
        x = rng.standard_normal(shape) * 2.0 + self.offset + rng.standard_normal(self.channels_shape())
        x = x.astype(self.dtype)
        dy = rng.standard_normal(shape).astype(self.dtype)
        c = self.channels
        return (x, dy, rng.standard_normal(c) + 1.0, rng.standard_normal(c), rng.standard_normal(c),
                rng.uniform(0.5, 2.0, c))

    def channels_shape(self):
        """A per-channel offset's shape, broadcasting against one sample."""
        ones = [1] * len(self.sample_shape)
        ones[0 if self.channel_axis == 1 else -1] = self.channels
        return tuple(ones)

    def split(self, a, world):
        bounds = np.cumsum([0] + self.shards(world))
        return [a[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


CASES = [
    Case("nchw_f64", (3, 4, 5), 1, "float64"),
    Case("nchw_f32", (3, 4, 5), 1, "float32"),
    Case("nhwc_f64", (4, 5, 3), -1, "float64"),
    Case("nhwc_f32", (4, 5, 3), -1, "float32"),
    Case("nc_f32", (6,), 1, "float32"),
    Case("nc_f64_last", (6,), -1, "float64"),
    Case("ncl_f32_far_from_zero", (2, 33), 1, "float32", offset=1000.0),
    Case("nc_f64_single_rows", (5,), 1, "float64", single_rows=True),
]


def reference(x, dy, weight, bias, channel_axis, eps=EPS):
    """float64 NumPy batch norm on the whole batch: (y, mean, invstd, unbiased var, dx, dweight, dbias)."""
    x = x.astype(np.float64)
    dy = dy.astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != channel_axis % x.ndim)
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    n = x.size // x.shape[channel_axis]
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    y = xhat * weight.reshape(shape) + bias.reshape(shape)
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    dx = (weight * invstd).reshape(shape) * (dy - (dbias / n).reshape(shape) - xhat * (dweight / n).reshape(shape))
    return y, mean, invstd, var * n / (n - 1), dx, dweight, dbias
