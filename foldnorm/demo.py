"""`foldnorm demo`: both halves of foldnorm on an embedded example, in well under a minute.

1. Builds a small ResNet-style CNN in code (foldnorm.fold.builder; seeded random weights) with a BatchNormalization
   of every kind the fold pass handles: after a Conv, across a residual Add and a Concat, before an
   unpadded Conv and a Gemm (forward folds), after a Gemm, and one on the model input in front of a padded
   Conv, which cannot fold and stays a BatchNormalization (one pass in onnxruntime, where Mul and Add take two).
2. Folds it with verification against onnxruntime and prints the report.
3. Times the original and the folded model in onnxruntime with graph optimizations disabled and enabled
   (median of repeated runs after warm-up, the two models interleaved).
4. Runs the normalization kernels on a realistic activation tensor, (8, 64, 56, 56) float32, against a
   float64 NumPy reference, prints their max errors and timings beside NumPy float32, and says in one
   line how their threads behave on a shared machine.
"""
import os
import statistics
import time

import numpy as np

from .fold.builder import IR_VERSION, OPSET, ModelBuilder

NUM_CLASSES = 10
# Each full-size kernel result must be this close to the float64 reference, relative to its magnitude.
KERNEL_RTOL = 1e-5
SHARED_MACHINE = ("on a shared machine the calling thread works too and never waits for a worker the operating "
                  "system has not scheduled; idle workers spin only while the machine has a core to spare")


def build_demo_model(image_size=224, width=32, seed=0):
    """The demo CNN: input [1, 3, image_size, image_size] float32, output logits [1, 10]."""
    b = ModelBuilder(seed)
    x = b.input("image", [1, 3, image_size, image_size])

    def conv(name, h, c_in, c_out, kernel, stride=1, pad=0, bias=True):
        return b.conv(h, c_in, c_out, kernel, stride=stride, pad=pad, bias=bias, name=name)

    def bn(name, h, channels, outputs=None):
        return b.frozen_batch_norm(h, channels, name=name, outputs=outputs)

    h = bn("input_bn", x, 3)  # in front of a padded Conv: cannot fold, kept as BatchNormalization
    h = conv("stem_conv", h, 3, width, 7, stride=2, pad=3, bias=False)
    h = b.relu(bn("stem_bn", h, width))
    h = b.node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])

    # A basic residual block: each BN folds backward into its Conv.
    y = b.relu(bn("block1_bn1", conv("block1_conv1", h, width, width, 3, pad=1), width))
    y = bn("block1_bn2", conv("block1_conv2", y, width, width, 3, pad=1), width)
    h = b.relu(b.node("Add", [y, h]))

    # A downsampling block normalized after the sum: the BN folds across the Add into both Convs.
    wide = 2 * width
    y = b.relu(bn("block2_bn1", conv("block2_conv1", h, width, wide, 3, stride=2, pad=1), wide))
    y = conv("block2_conv2", y, wide, wide, 3, pad=1)
    shortcut = conv("block2_shortcut", h, width, wide, 1, stride=2)
    h = b.relu(bn("block2_bn_after_add", b.node("Add", [y, shortcut]), wide))

    # Two branches joined by a Concat, normalized after it: each Conv absorbs its slice of the BN.
    left = conv("mix_conv1x1", h, wide, width, 1)
    right = conv("mix_conv3x3", h, wide, width, 3, pad=1)
    h = b.relu(bn("mix_bn_after_concat", b.node("Concat", [left, right], axis=1), wide))

    # A pre-activation BN before an unpadded Conv: folds forward into the Conv.
    h = b.relu(conv("transition_conv", bn("transition_bn", h, wide), wide, wide, 1))

    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    h = bn("features_bn", h, wide)  # forward into the Gemm
    logits = bn("head_bn", b.gemm(h, wide, NUM_CLASSES, name="head_gemm"), NUM_CLASSES, outputs=["logits"])
    b.output(logits, [1, NUM_CLASSES])
    return b.model(OPSET, IR_VERSION, name="demo_cnn", producer="foldnorm-demo", check=True)

def run_demo(quick=False):
    """Run the demo, printing as it goes; returns 0 when the fold verified and every kernel is accurate."""
    results = demo_results(quick=quick, echo=print)
    return 0 if results["ok"] else 1


def demo_results(quick=False, echo=print):
    """The demo's numbers as a dict (what run_demo prints, through `echo`)."""
    from .fold import fold_model
    from .kernels import get_num_threads

    start = time.perf_counter()
    image_size = 96 if quick else 224
    repeats = 5 if quick else 30
    threads = get_num_threads()
    model = build_demo_model(image_size=image_size)
    bns_before = count_ops(model, "BatchNormalization")
    echo("foldnorm demo: a ResNet-style CNN, input 1x3x%dx%d, %d BatchNormalization nodes, %d threads"
         % (image_size, image_size, bns_before, threads))
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        echo("(load average %.1f on %d cores: other work shares these cores, so the timings below are noisy)"
             % (os.getloadavg()[0], os.cpu_count() or 1))
    echo("")
    folded, report = fold_model(model, verify=True)
    report.model = "the demo CNN (built in code)"
    echo(report.format_text())
    echo("")
    bns_after = count_ops(folded, "BatchNormalization")

    latency = measure_latency(model, folded, repeats=repeats, threads=threads)
    echo("onnxruntime latency, median of %d runs after warm-up (ms):" % repeats)
    echo("  %-24s %10s %10s %9s" % ("graph optimizations", "original", "folded", "speed-up"))
    for level, (before, after) in latency.items():
        echo("  %-24s %10.3f %10.3f %8.2fx" % (level, before * 1e3, after * 1e3, before / after))
    echo("")

    kernel_shape = (2, 16, 28, 28) if quick else (8, 64, 56, 56)
    kernels = run_kernels(kernel_shape, repeats=3 if quick else 10, threads=threads)
    if kernels is None:
        echo("kernels: the compiled extensions are not built (make install builds them); skipped")
    else:
        echo("kernels on a %s float32 activation, against a float64 NumPy reference:" % (kernel_shape,))
        echo("  %-28s %12s %12s %14s" % ("kernel", "max rel err", "time (ms)", "NumPy f32 (ms)"))
        for name, row in kernels.items():
            echo("  %-28s %12.2e %12.3f %14.3f"
                 % (name, row["max_rel_error"], row["seconds"] * 1e3, row["numpy_seconds"] * 1e3))
        echo("  threads: %s" % SHARED_MACHINE)
    kernels_ok = kernels is None or all(row["max_rel_error"] <= KERNEL_RTOL for row in kernels.values())
    seconds = time.perf_counter() - start
    echo("")
    echo("demo finished in %.1f s" % seconds)
    return {
        "ok": report.verification is not None and report.verification.passed and kernels_ok,
        "report": report,
        "bns_before": bns_before,
        "bns_after": bns_after,
        "latency": latency,
        "kernels": kernels,
        "seconds": seconds,
    }


def count_ops(model, op_type):
    """Nodes of `op_type` in a model, subgraphs included."""
    def count(graph):
        total = 0
        for node in graph.node:
            total += node.op_type == op_type
            for attribute in node.attribute:
                for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    total += count(subgraph)
        return total

    return count(model.graph)


def measure_latency(original, folded, *, repeats, threads, warmup=3):
    """{level: (original seconds, folded seconds)}: medians, the two models run alternately."""
    import onnxruntime as ort

    feed = {"image": np.random.default_rng(1).standard_normal(_input_shape(original)).astype(np.float32)}
    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "enabled (ORT_ENABLE_ALL)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    latency = {}
    for label, level in levels.items():
        sessions = [_session(m, level, threads) for m in (original, folded)]
        times = ([], [])
        for i in range(warmup + repeats):
            for session, samples in zip(sessions, times):
                tic = time.perf_counter()
                session.run(None, feed)
                if i >= warmup:
                    samples.append(time.perf_counter() - tic)
        latency[label] = (statistics.median(times[0]), statistics.median(times[1]))
    return latency


def run_kernels(shape, *, repeats, threads, seed=0):
    """{kernel: {max_rel_error, seconds, numpy_seconds}} on one activation tensor, or None when not built.

    max_rel_error is the largest |kernel - reference| over the largest |reference| of each result (y and,
    where the kernel returns them, its statistics), against a float64 reference computed here.
    """
    try:
        from .kernels import batch_norm, batch_norm_train
        from .kernels import group_norm, instance_norm
        from .kernels import layer_norm, rms_norm
    except ImportError:
        return None

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(np.float32)
    channels = shape[1]
    weight = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    mean = rng.standard_normal(channels).astype(np.float32) * 0.1
    var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    eps = 1e-5
    x64 = x.astype(np.float64)
    per_channel = (1, channels) + (1,) * (len(shape) - 2)
    groups = 8 if channels % 8 == 0 else 1
    spatial = tuple(range(2, len(shape)))

    def affine(y, w, b):
        return y * w.astype(np.float64).reshape(per_channel) + b.astype(np.float64).reshape(per_channel)

    def normalized(a, axes):
        m = a.mean(axis=axes, keepdims=True)
        return (a - m) / np.sqrt(((a - m) ** 2).mean(axis=axes, keepdims=True) + eps)

    def group_reference(a):
        grouped = a.reshape(shape[0], groups, -1)
        return affine(normalized(grouped, (2,)).reshape(shape), weight, bias)

    def numpy_float32(a, axes):
        m = a.mean(axis=axes, keepdims=True, dtype=np.float32)
        return (a - m) / np.sqrt(((a - m) ** 2).mean(axis=axes, keepdims=True) + np.float32(eps))

    lw = np.ones(shape[1:], np.float32)
    cases = {
        "batch_norm (inference)": (
            lambda: batch_norm(x, mean, var, weight, bias, eps=eps, num_threads=threads),
            lambda: affine((x64 - mean.astype(np.float64).reshape(per_channel))
                           / np.sqrt(var.astype(np.float64).reshape(per_channel) + eps), weight, bias),
            lambda: (x - mean.reshape(per_channel)) / np.sqrt(var.reshape(per_channel) + np.float32(eps))
            * weight.reshape(per_channel) + bias.reshape(per_channel),
        ),
        "batch_norm_train": (
            lambda: batch_norm_train(x, weight, bias, eps=eps, num_threads=threads)[0],
            lambda: affine(normalized(x64, (0,) + spatial), weight, bias),
            lambda: numpy_float32(x, (0,) + spatial) * weight.reshape(per_channel) + bias.reshape(per_channel),
        ),
        "layer_norm (C,H,W)": (
            lambda: layer_norm(x, lw, axis=1, eps=eps, num_threads=threads)[0],
            lambda: normalized(x64, tuple(range(1, len(shape)))),
            lambda: numpy_float32(x, tuple(range(1, len(shape)))),
        ),
        "rms_norm (C,H,W)": (
            lambda: rms_norm(x, lw, axis=1, eps=eps, num_threads=threads)[0],
            lambda: x64 / np.sqrt((x64 ** 2).mean(axis=tuple(range(1, len(shape))), keepdims=True) + eps),
            lambda: x / np.sqrt((x * x).mean(axis=tuple(range(1, len(shape))), keepdims=True) + np.float32(eps)),
        ),
        "group_norm (%d groups)" % groups: (
            lambda: group_norm(x, groups, weight, bias, eps=eps, num_threads=threads)[0],
            lambda: group_reference(x64),
            lambda: numpy_float32(x.reshape(shape[0], groups, -1), (2,)).reshape(shape) * weight.reshape(per_channel)
            + bias.reshape(per_channel),
        ),
        "instance_norm": (
            lambda: instance_norm(x, weight, bias, eps=eps, num_threads=threads)[0],
            lambda: affine(normalized(x64, spatial), weight, bias),
            lambda: numpy_float32(x, spatial) * weight.reshape(per_channel) + bias.reshape(per_channel),
        ),
    }
    rows = {}
    for name, (kernel, reference, numpy_baseline) in cases.items():
        expected = reference()
        got = kernel().astype(np.float64)
        rows[name] = {
            "max_rel_error": float(np.abs(got - expected).max() / np.abs(expected).max()),
            "seconds": _median_seconds(kernel, repeats),
            "numpy_seconds": _median_seconds(numpy_baseline, repeats),
        }
    return rows


def _median_seconds(function, repeats):
    function()
    samples = []
    for _ in range(repeats):
        tic = time.perf_counter()
        function()
        samples.append(time.perf_counter() - tic)
    return statistics.median(samples)


def _session(model, level, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle worker threads of one session would otherwise spin on the cores the other session is timed on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _input_shape(model):
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]

