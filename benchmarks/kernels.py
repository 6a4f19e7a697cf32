"""Kernel benchmarks: every public foldnorm kernel beside a copy of the same size, NumPy, onnxruntime, torch.

Each case builds its data once; every contender then writes its outputs the way its API allows:
foldnorm into a preallocated `out=` where the function has one (batch_norm, batch_norm_train), otherwise
into arrays it allocates itself; the copy into a preallocated destination; onnxruntime into preallocated
outputs bound with IOBinding; torch through its own allocator (torch.nn.functional has no `out=`); the
NumPy reference allocates freely (it is the slow float64 baseline, not a contender for speed).

Byte model (what GB/s counts, in units of the tensor's size S in bytes): inference batch norm reads x and
writes y (2S); batch_norm_train reads x twice, once for the statistics and once to apply them, and writes
y (3S); batch_norm_backward reads dy and x twice and writes dx (5S), or once each (3S) where it takes a
channel at a time (planes of BN_CHANNEL_MIN_PLANE_BYTES or more: a channel's dy and x stay in cache between
its two passes). Layer, RMS, group and instance norm
normalize groups small enough to stay in cache between their two passes: forward 2S, backward 3S
(dy and x read, dx written). The copy moves 2S.
"""
import json
from dataclasses import dataclass

import numpy as np

from .harness import Contender, Unavailable, first_line, foldnorm_function

EPS = 1e-5
MOMENTUM = 0.1
ORT_IR_VERSION = 10


@dataclass(frozen=True)
class KernelCase:
    kernel: str
    shape: tuple
    groups: int = 0
    channels_last: bool = False

    @property
    def label(self):
        return self.kernel + (" NHWC" if self.channels_last else "")

    @property
    def shape_label(self):
        text = "x".join(str(d) for d in self.shape)
        return text + (" g%d" % self.groups if self.groups else "")

    @property
    def key(self):
        return "%s/%s" % (self.label.replace(" ", "_"), self.shape_label.replace(" ", "_"))

    @property
    def elements(self):
        return int(np.prod(self.shape))

    @property
    def traffic_bytes(self):
        """Bytes the kernel must move (see the module docstring), for float32."""
        passes = TRAFFIC[self.kernel]
        if self.kernel == "batch_norm_backward" and not self.channels_last and len(self.shape) > 2 \
                and int(np.prod(self.shape[2:])) * 4 >= BN_CHANNEL_MIN_PLANE_BYTES:
            passes = 3  # a channel at a time: its x and dy read once
        return passes * self.elements * 4


def cases_from_spec(text):
    """The KernelCases of a JSON list of [kernel, shape, groups, channels_last] (what counts.case_spec writes)."""
    return [KernelCase(kernel, tuple(shape), groups, channels_last)
            for kernel, shape, groups, channels_last in json.loads(text)]


# src_c/batch_norm.c's threshold for batch_norm_backward a channel at a time.
BN_CHANNEL_MIN_PLANE_BYTES = 2048

TRAFFIC = {
    "batch_norm": 2,
    "batch_norm_train": 3,
    "batch_norm_backward": 5,
    "layer_norm": 2,
    "layer_norm_backward": 3,
    "rms_norm": 2,
    "rms_norm_backward": 3,
    "group_norm": 2,
    "group_norm_backward": 3,
    "instance_norm": 2,
    "instance_norm_backward": 3,
}

RESNET_STAGES = [(32, 64, 56, 56), (32, 256, 28, 28), (32, 512, 7, 7)]
TRANSFORMER_WIDTHS = [(8192, 768), (2048, 4096)]
GROUP_NORM_SHAPES = [(16, 256, 32, 32), (8, 320, 64, 64)]

BATCH_NORM_HEADLINE = (32, 256, 28, 28)
LAYER_NORM_HEADLINE = (8192, 768)
GROUP_NORM_HEADLINE = (16, 256, 32, 32)


def _cases(batch_shapes, row_shapes, group_shapes):
    cases = []
    for shape in batch_shapes:
        cases += [
            KernelCase("batch_norm", shape),
            KernelCase("batch_norm", shape, channels_last=True),
            KernelCase("batch_norm_train", shape),
            KernelCase("batch_norm_backward", shape),
        ]
    for shape in row_shapes:
        cases += [KernelCase(k, shape) for k in ("layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward")]
    for shape in group_shapes:
        cases += [KernelCase(k, shape, groups=32) for k in ("group_norm", "group_norm_backward")]
        cases += [KernelCase(k, shape) for k in ("instance_norm", "instance_norm_backward")]
    return cases


FULL_CASES = _cases(RESNET_STAGES, TRANSFORMER_WIDTHS, GROUP_NORM_SHAPES)
QUICK_CASES = _cases([BATCH_NORM_HEADLINE], [LAYER_NORM_HEADLINE], [GROUP_NORM_HEADLINE])
SMOKE_CASES = [
    KernelCase("batch_norm", (2, 64, 4, 4)),
    KernelCase("batch_norm_train", (2, 64, 4, 4)),
    KernelCase("layer_norm", (16, 64)),
    KernelCase("group_norm_backward", (2, 64, 4, 4), groups=32),
]


def _torch():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        raise Unavailable("torch is not importable") from None
    return torch, F


def _ort_single_node(op_type, opset, x, initializers, outputs, attrs, threads):
    """A callable running one onnxruntime node on x, writing into the preallocated arrays of `outputs`.

    initializers: list of (name, array) after x; outputs: list of (name, preallocated float32 array).
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(op_type, ["x"] + [name for name, _ in initializers], [n for n, _ in outputs], **attrs)
    graph = helper.make_graph(
        [node],
        op_type,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, a.shape) for name, a in outputs],
        initializer=[numpy_helper.from_array(a, name) for name, a in initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ORT_IR_VERSION
    session = ort.InferenceSession(model.SerializeToString(), ort_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
    for name, array in outputs:
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
    return lambda: session.run_with_iobinding(binding)


def ort_session_options(threads, level=None):
    """onnxruntime options for `threads` intra-op threads.

    Spinning is off: the contenders run one after another, and a pool left spinning would take the cores
    from the next one.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if level is not None:
        options.graph_optimization_level = level
    return options


def _broadcast(values, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _moments(x, axes):
    xd = x.astype(np.float64)
    mean = xd.mean(axis=axes, keepdims=True)
    var = ((xd - mean) ** 2).mean(axis=axes, keepdims=True)
    return xd, mean, 1.0 / np.sqrt(var + EPS)


def _normalize_backward(dy, xd, mean, invstd, weight, axes):
    """dx of y = xhat * weight + b, xhat normalized over `axes` (float64); weight broadcasts against x."""
    count = np.prod([xd.shape[a] for a in axes])
    xhat = (xd - mean) * invstd
    g = dy.astype(np.float64) * weight
    sum_g = g.sum(axis=axes, keepdims=True)
    sum_gx = (g * xhat).sum(axis=axes, keepdims=True)
    return invstd / count * (count * g - sum_g - xhat * sum_gx)


class KernelBench:
    """Data of one case and a factory for each contender; a factory raises Unavailable when it cannot run."""

    torch_note = None

    def __init__(self, case, rng):
        self.case = case
        self.rng = rng
        self.x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 0.5).astype(np.float32)
        self.dy = rng.standard_normal(case.shape, dtype=np.float32)

    def param(self, n, low=0.5, high=1.5):
        return self.rng.uniform(low, high, n).astype(np.float32)

    def reference(self):
        raise NotImplementedError

    def foldnorm(self, threads):
        raise NotImplementedError

    def onnxruntime(self, threads):
        raise Unavailable("onnxruntime's inference build has no operator for %s" % self.case.kernel)

    def torch(self, threads):
        raise NotImplementedError


class BatchNormBench(KernelBench):
    """Batch norm of (N, C, ...) over every axis but C; channels-last cases hold x as (N, ..., C)."""

    def __init__(self, case, rng):
        super().__init__(case, rng)
        self.ndim = len(case.shape)
        if case.channels_last:
            self.x = np.ascontiguousarray(np.moveaxis(self.x, 1, -1))
            self.dy = np.ascontiguousarray(np.moveaxis(self.dy, 1, -1))
        self.axis = self.ndim - 1 if case.channels_last else 1
        self.channel_axis = -1 if case.channels_last else 1
        self.reduce_axes = tuple(a for a in range(self.ndim) if a != self.axis)
        self.channels = case.shape[1]
        self.weight = self.param(self.channels)
        self.bias = self.param(self.channels, -0.5, 0.5)
        self.running_mean = self.param(self.channels, -0.5, 0.5)
        self.running_var = self.param(self.channels)
        self.y = np.empty_like(self.x)

    def _b(self, values):
        return _broadcast(values, self.ndim, self.axis)

    def _torch_nchw(self, array):
        torch, _ = _torch()
        tensor = torch.from_numpy(array)
        return tensor.movedim(-1, 1) if self.case.channels_last else tensor

    def _torch_params(self):
        torch, _ = _torch()
        return [torch.from_numpy(a.copy()) for a in (self.running_mean, self.running_var, self.weight, self.bias)]


class BatchNormInference(BatchNormBench):
    def reference(self):
        xd = self.x.astype(np.float64)
        scale = self.weight / np.sqrt(self.running_var.astype(np.float64) + EPS)
        return (xd - self._b(self.running_mean)) * self._b(scale) + self._b(self.bias)

    def foldnorm(self, threads):
        fn = foldnorm_function("batch_norm")
        args = (self.x, self.running_mean, self.running_var, self.weight, self.bias)
        return lambda: fn(*args, eps=EPS, channel_axis=self.channel_axis, out=self.y, num_threads=threads)

    def onnxruntime(self, threads):
        if self.case.channels_last:
            raise Unavailable("onnxruntime's BatchNormalization takes NCHW only")
        params = [("scale", self.weight), ("b", self.bias), ("mean", self.running_mean), ("var", self.running_var)]
        out = [("y", np.empty_like(self.x))]
        return _ort_single_node("BatchNormalization", 15, self.x, params, out, {"epsilon": EPS}, threads)

    def torch(self, threads):
        _, F = _torch()
        x = self._torch_nchw(self.x)
        mean, var, weight, bias = self._torch_params()
        return lambda: F.batch_norm(x, mean, var, weight, bias, training=False, eps=EPS)


class BatchNormTrain(BatchNormBench):
    def reference(self):
        xd, mean, invstd = _moments(self.x, self.reduce_axes)
        return (xd - mean) * invstd * self._b(self.weight) + self._b(self.bias)

    def foldnorm(self, threads):
        fn = foldnorm_function("batch_norm_train")
        running_mean, running_var = self.running_mean.copy(), self.running_var.copy()
        return lambda: fn(
            self.x, self.weight, self.bias, running_mean=running_mean, running_var=running_var,
            momentum=MOMENTUM, eps=EPS, channel_axis=self.channel_axis, out=self.y, num_threads=threads,
        )

    def onnxruntime(self, threads):
        params = [("scale", self.weight), ("b", self.bias), ("mean", self.running_mean), ("var", self.running_var)]
        out = [("y", np.empty_like(self.x)), ("running_mean", np.empty_like(self.weight)),
               ("running_var", np.empty_like(self.weight))]
        attrs = {"epsilon": EPS, "momentum": 1 - MOMENTUM, "training_mode": 1}
        return _ort_single_node("BatchNormalization", 15, self.x, params, out, attrs, threads)

    def torch(self, threads):
        _, F = _torch()
        x = self._torch_nchw(self.x)
        mean, var, weight, bias = self._torch_params()
        return lambda: F.batch_norm(x, mean, var, weight, bias, training=True, momentum=MOMENTUM, eps=EPS)


class BatchNormBackward(BatchNormBench):
    def reference(self):
        xd, mean, invstd = _moments(self.x, self.reduce_axes)
        return _normalize_backward(self.dy, xd, mean, invstd, self._b(self.weight), self.reduce_axes)

    def foldnorm(self, threads):
        forward = foldnorm_function("batch_norm_train")
        fn = foldnorm_function("batch_norm_backward")
        _, mean, invstd = forward(self.x, self.weight, self.bias, eps=EPS, channel_axis=self.channel_axis)
        return lambda: fn(self.dy, self.x, mean, invstd, self.weight, channel_axis=self.channel_axis,
                          num_threads=threads)

    def torch(self, threads):
        torch, _ = _torch()
        _, mean, invstd = _moments(self.x, self.reduce_axes)
        mean = torch.from_numpy(mean.reshape(-1).astype(np.float32))
        invstd = torch.from_numpy(invstd.reshape(-1).astype(np.float32))
        x, dy = self._torch_nchw(self.x), self._torch_nchw(self.dy)
        weight = torch.from_numpy(self.weight)
        backward = torch.ops.aten.native_batch_norm_backward
        return lambda: backward(dy, x, weight, None, None, mean, invstd, True, EPS, [True, True, True])


class RowNormBench(KernelBench):
    """Layer and RMS norm over the last axis of a (rows, width) array."""

    def __init__(self, case, rng):
        super().__init__(case, rng)
        self.width = case.shape[-1]
        self.weight = self.param(self.width)
        self.bias = self.param(self.width, -0.5, 0.5)


class LayerNorm(RowNormBench):
    def reference(self):
        xd, mean, invstd = _moments(self.x, (1,))
        return (xd - mean) * invstd * self.weight + self.bias

    def foldnorm(self, threads):
        fn = foldnorm_function("layer_norm")
        return lambda: fn(self.x, self.weight, self.bias, axis=-1, eps=EPS, num_threads=threads)

    def onnxruntime(self, threads):
        rows = self.case.shape[0]
        out = [("y", np.empty_like(self.x)), ("mean", np.empty((rows, 1), np.float32)),
               ("invstd", np.empty((rows, 1), np.float32))]
        params = [("scale", self.weight), ("b", self.bias)]
        return _ort_single_node("LayerNormalization", 17, self.x, params, out, {"axis": -1, "epsilon": EPS}, threads)

    def torch(self, threads):
        torch, F = _torch()
        x, weight, bias = (torch.from_numpy(a) for a in (self.x, self.weight, self.bias))
        return lambda: F.layer_norm(x, (self.width,), weight, bias, EPS)


class LayerNormBackward(RowNormBench):
    def reference(self):
        xd, mean, invstd = _moments(self.x, (1,))
        return _normalize_backward(self.dy, xd, mean, invstd, self.weight, (1,))

    def foldnorm(self, threads):
        forward = foldnorm_function("layer_norm")
        fn = foldnorm_function("layer_norm_backward")
        _, mean, invstd = forward(self.x, self.weight, self.bias, axis=-1, eps=EPS)
        return lambda: fn(self.dy, self.x, mean, invstd, self.weight, axis=-1, num_threads=threads)

    def torch(self, threads):
        torch, _ = _torch()
        _, mean, invstd = _moments(self.x, (1,))
        mean, invstd = (torch.from_numpy(a.astype(np.float32)) for a in (mean, invstd))
        x, dy, weight, bias = (torch.from_numpy(a) for a in (self.x, self.dy, self.weight, self.bias))
        backward = torch.ops.aten.native_layer_norm_backward
        return lambda: backward(dy, x, [self.width], mean, invstd, weight, bias, [True, True, True])


def _invrms(x):
    xd = x.astype(np.float64)
    return xd, 1.0 / np.sqrt((xd * xd).mean(axis=1, keepdims=True) + EPS)


class RmsNorm(RowNormBench):
    def reference(self):
        xd, invrms = _invrms(self.x)
        return xd * invrms * self.weight

    def foldnorm(self, threads):
        fn = foldnorm_function("rms_norm")
        return lambda: fn(self.x, self.weight, axis=-1, eps=EPS, num_threads=threads)

    def onnxruntime(self, threads):
        out = [("y", np.empty_like(self.x))]
        return _ort_single_node("RMSNormalization", 23, self.x, [("scale", self.weight)], out,
                                {"axis": -1, "epsilon": EPS}, threads)

    def torch(self, threads):
        torch, F = _torch()
        x, weight = torch.from_numpy(self.x), torch.from_numpy(self.weight)
        return lambda: F.rms_norm(x, (self.width,), weight, EPS)


class RmsNormBackward(RowNormBench):
    def reference(self):
        xd, invrms = _invrms(self.x)
        g = self.dy.astype(np.float64) * self.weight
        return invrms * (g - xd * invrms**2 * (g * xd).mean(axis=1, keepdims=True))

    def foldnorm(self, threads):
        forward = foldnorm_function("rms_norm")
        fn = foldnorm_function("rms_norm_backward")
        _, invrms = forward(self.x, self.weight, axis=-1, eps=EPS)
        return lambda: fn(self.dy, self.x, invrms, self.weight, axis=-1, num_threads=threads)

    torch_note = "autograd's backward of F.rms_norm (torch's CPU build has no fused RMS norm backward)"

    def torch(self, threads):
        """Autograd's backward of F.rms_norm, the graph kept from one forward: what a torch user gets."""
        torch, F = _torch()
        x = torch.from_numpy(self.x.copy()).requires_grad_()
        weight = torch.from_numpy(self.weight.copy()).requires_grad_()
        y = F.rms_norm(x, (self.width,), weight, EPS)
        dy = torch.from_numpy(self.dy)
        return lambda: torch.autograd.grad(y, (x, weight), dy, retain_graph=True)


class GroupNormBench(KernelBench):
    """Group norm of (N, C, H, W) over `groups` channel groups; instance norm is groups == C."""

    def __init__(self, case, rng):
        super().__init__(case, rng)
        self.n, self.channels = case.shape[:2]
        self.spatial = int(np.prod(case.shape[2:]))
        self.groups = case.groups or self.channels
        self.weight = self.param(self.channels)
        self.bias = self.param(self.channels, -0.5, 0.5)

    def _grouped(self, array):
        return array.reshape(self.n, self.groups, -1)

    def _reference_forward(self):
        xd, mean, invstd = _moments(self._grouped(self.x), (2,))
        y = ((xd - mean) * invstd).reshape(self.case.shape)
        return y * _broadcast(self.weight, 4, 1) + _broadcast(self.bias, 4, 1)

    def _reference_backward(self):
        xd, mean, invstd = _moments(self._grouped(self.x), (2,))
        weight = np.repeat(self.weight, self.spatial)
        dx = _normalize_backward(self._grouped(self.dy), xd, mean, invstd, weight.reshape(1, self.groups, -1), (2,))
        return dx.reshape(self.case.shape)

    def _torch_stats(self):
        torch, _ = _torch()
        _, mean, invstd = _moments(self._grouped(self.x), (2,))
        return [torch.from_numpy(a.reshape(self.n, self.groups).astype(np.float32)) for a in (mean, invstd)]

    def _torch_backward(self):
        torch, _ = _torch()
        mean, invstd = self._torch_stats()
        x, dy, weight = (torch.from_numpy(a) for a in (self.x, self.dy, self.weight))
        backward = torch.ops.aten.native_group_norm_backward
        args = (self.n, self.channels, self.spatial, self.groups, [True, True, True])
        return lambda: backward(dy, x, mean, invstd, weight, *args)


class GroupNorm(GroupNormBench):
    reference = GroupNormBench._reference_forward

    def foldnorm(self, threads):
        fn = foldnorm_function("group_norm")
        return lambda: fn(self.x, self.groups, self.weight, self.bias, eps=EPS, num_threads=threads)

    def onnxruntime(self, threads):
        params = [("scale", self.weight), ("b", self.bias)]
        attrs = {"num_groups": self.groups, "epsilon": EPS}
        out = [("y", np.empty_like(self.x))]
        return _ort_single_node("GroupNormalization", 21, self.x, params, out, attrs, threads)

    def torch(self, threads):
        torch, F = _torch()
        x, weight, bias = (torch.from_numpy(a) for a in (self.x, self.weight, self.bias))
        return lambda: F.group_norm(x, self.groups, weight, bias, EPS)


class GroupNormBackward(GroupNormBench):
    reference = GroupNormBench._reference_backward

    def torch(self, threads):
        return self._torch_backward()

    def foldnorm(self, threads):
        forward = foldnorm_function("group_norm")
        fn = foldnorm_function("group_norm_backward")
        _, mean, invstd = forward(self.x, self.groups, self.weight, self.bias, eps=EPS)
        return lambda: fn(self.dy, self.x, mean, invstd, self.groups, self.weight, num_threads=threads)


class InstanceNorm(GroupNormBench):
    reference = GroupNormBench._reference_forward

    def foldnorm(self, threads):
        fn = foldnorm_function("instance_norm")
        return lambda: fn(self.x, self.weight, self.bias, eps=EPS, num_threads=threads)

    def onnxruntime(self, threads):
        params = [("scale", self.weight), ("b", self.bias)]
        return _ort_single_node("InstanceNormalization", 17, self.x, params, [("y", np.empty_like(self.x))],
                                {"epsilon": EPS}, threads)

    def torch(self, threads):
        torch, F = _torch()
        x, weight, bias = (torch.from_numpy(a) for a in (self.x, self.weight, self.bias))
        return lambda: F.instance_norm(x, weight=weight, bias=bias, eps=EPS)


class InstanceNormBackward(GroupNormBench):
    torch_note = "native_group_norm_backward with C groups (torch has no instance-norm backward operator)"

    reference = GroupNormBench._reference_backward

    def foldnorm(self, threads):
        forward = foldnorm_function("instance_norm")
        fn = foldnorm_function("instance_norm_backward")
        _, mean, invstd = forward(self.x, self.weight, self.bias, eps=EPS)
        return lambda: fn(self.dy, self.x, mean, invstd, self.weight, num_threads=threads)

    def torch(self, threads):
        return self._torch_backward()


BENCHES = {
    "batch_norm": BatchNormInference,
    "batch_norm_train": BatchNormTrain,
    "batch_norm_backward": BatchNormBackward,
    "layer_norm": LayerNorm,
    "layer_norm_backward": LayerNormBackward,
    "rms_norm": RmsNorm,
    "rms_norm_backward": RmsNormBackward,
    "group_norm": GroupNorm,
    "group_norm_backward": GroupNormBackward,
    "instance_norm": InstanceNorm,
    "instance_norm_backward": InstanceNormBackward,
}


def time_against_copy(bench, threads, repeats, warmup=1, settle=0.0):
    """Samples of the bench's foldnorm call and of the same-size multi-threaded copy at every thread count,
    interleaved: keys foldnorm@t and copy@t. Unavailable when foldnorm cannot run the case."""
    from .harness import measure, parallel_copy

    destination = np.empty_like(bench.x)
    contenders = []
    for t in threads:
        contenders.append(Contender("foldnorm", t, bench.foldnorm(t)))
        contenders.append(Contender("copy", t, lambda t=t: parallel_copy(destination, bench.x, t)))
    return measure(contenders, repeats, warmup=warmup, settle=settle)


def run_case(case, threads, repeats, warmup=1, reference_repeats=1, settle=0.0, seed=0):
    """Time one case at every thread count; returns its JSON-ready result (with `skipped` if it cannot run)."""
    from .harness import thread_settings_kept

    with thread_settings_kept():
        return _run_case(case, threads, repeats, warmup, reference_repeats, settle, seed)


def _run_case(case, threads, repeats, warmup, reference_repeats, settle, seed):
    from .harness import measure, paired_efficiency, paired_ratio, parallel_copy

    result = {
        "key": case.key,
        "kernel": case.kernel,
        "label": case.label,
        "shape": list(case.shape),
        "shape_label": case.shape_label,
        "groups": case.groups,
        "channels_last": case.channels_last,
        "elements": case.elements,
        "traffic_bytes": case.traffic_bytes,
        "notes": [],
    }
    bench = BENCHES[case.kernel](case, np.random.default_rng(seed))
    try:
        foldnorm_runs = {t: bench.foldnorm(t) for t in threads}
        foldnorm_runs[threads[-1]]()
    except Unavailable as error:
        result["skipped"] = str(error)
        return result
    except Exception as error:  # a kernel still in progress must not stop the other cases
        result["skipped"] = "foldnorm's %s failed: %s" % (case.kernel, first_line(error))
        return result

    contenders = []
    copy_destination = np.empty_like(bench.x)
    for t in threads:
        contenders.append(Contender("foldnorm", t, foldnorm_runs[t]))
        contenders.append(Contender("copy", t, lambda t=t: parallel_copy(copy_destination, bench.x, t)))
    contenders += _optional_contenders(bench, threads, result["notes"])
    reference_output = {}
    contenders.append(Contender(
        "numpy", 1, lambda: reference_output.__setitem__("y", bench.reference()), sparse=True
    ))

    samples = measure(contenders, repeats, warmup=warmup, sparse_repeats=reference_repeats, settle=settle)
    result["timings"] = {key: s.summary() for key, s in samples.items()}
    result["max_abs_error"] = _max_abs_error(foldnorm_runs[threads[-1]](), reference_output["y"])
    if result["max_abs_error"] > 1e-3 * max(1.0, float(np.max(np.abs(reference_output["y"])))):
        result["notes"].append("foldnorm's output differs from the float64 reference by %.3g" % result["max_abs_error"])

    rows = []
    for t in threads:
        mine = samples["foldnorm@%d" % t]
        copy = samples["copy@%d" % t]
        median = mine.summary()["median"]
        row = {
            "threads": t,
            "foldnorm": mine.summary(),
            "gbps": case.traffic_bytes / median / 1e9,
            "copy_gbps": 2 * case.elements * 4 / copy.summary()["median"] / 1e9,
            "x_copy": paired_ratio(mine, copy),
            "roof": paired_ratio(copy, mine),
            "vs_numpy": paired_ratio(samples["numpy@1"], mine),
            "scaling": paired_ratio(samples["foldnorm@%d" % threads[0]], mine) if t != threads[0] else None,
            "copy_scaling": paired_ratio(samples["copy@%d" % threads[0]], copy) if t != threads[0] else None,
            "efficiency": paired_efficiency(samples["foldnorm@%d" % threads[0]], mine, samples["copy@%d" % threads[0]],
                                            copy) if t != threads[0] else None,
        }
        for name in ("onnxruntime", "torch"):
            other = samples.get("%s@%d" % (name, t))
            row["vs_" + name] = paired_ratio(other, mine) if other is not None else None
            row[name + "_gbps"] = case.traffic_bytes / other.summary()["median"] / 1e9 if other is not None else None
        rows.append(row)
    result["rows"] = rows
    return result


def _optional_contenders(bench, threads, notes):
    """onnxruntime and torch contenders that can run here; a note for each that cannot."""
    contenders = []
    for t in threads:
        try:
            run = bench.onnxruntime(t)
            run()
            contenders.append(Contender("onnxruntime", t, run))
        except Unavailable as error:
            _note_once(notes, "onnxruntime: %s" % error)
        except Exception as error:  # an operator this onnxruntime build lacks is a note, not a crash
            _note_once(notes, "onnxruntime failed: %s" % first_line(error))
    for t in threads:
        try:
            torch, _ = _torch()
            run = bench.torch(t)
            torch.set_num_threads(t)
            run()
            contenders.append(Contender("torch", t, run, prepare=lambda t=t: torch.set_num_threads(t)))
            if bench.torch_note:
                _note_once(notes, "torch: %s" % bench.torch_note)
        except Unavailable as error:
            _note_once(notes, "torch: %s" % error)
        except Exception as error:
            _note_once(notes, "torch failed: %s" % first_line(error))
    return contenders


def _note_once(notes, text):
    if text not in notes:
        notes.append(text)


def _max_abs_error(output, reference):
    primary = output[0] if isinstance(output, tuple) else output
    return float(np.max(np.abs(np.asarray(primary, dtype=np.float64) - reference)))
