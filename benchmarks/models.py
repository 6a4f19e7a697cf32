"""Model benchmarks: onnxruntime latency of a model before and after `foldnorm fold`, and after
onnxruntime's own basic-level optimization, each run with graph optimizations disabled and enabled.

The models: the light_* models shipped inside the onnx package that contain BatchNormalization, and two
generated CNNs (ResNet-like and MobileNet-like, BatchNormalization after every convolution). A third
generated model, a long chain of Conv+BatchNormalization pairs, is only folded (see fold_scaling.py).
The light models ship with every weight produced at run time by a ConstantOfShape node (all 0.02), which
no fold can see as constant; they are first materialized: each such weight becomes an initializer of seeded
random values of the same shape, sized for its role (He-scaled convolution weights, positive variances),
and the IR-3 habit of listing initializers as graph inputs (which makes them overridable, so not
constant) is dropped.
"""
import os
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .harness import Contender, Unavailable, first_line, measure, paired_ratio
from .kernels import ort_session_options

IR_VERSION = 8
OPSET = 13
LEVELS = {"disabled": "ORT_DISABLE_ALL", "enabled": "ORT_ENABLE_ALL"}
RATIO_PAIRS = {
    "folded_vs_original": ("folded", "original"),
    "ort_basic_vs_original": ("ort_basic", "original"),
    "folded_vs_ort_basic": ("folded", "ort_basic"),
}
# The other light models (AlexNet, Inception v1, SqueezeNet, VGG-19, ZFNet) have no BatchNormalization.
LIGHT_WITH_BATCH_NORM = ("light_resnet50", "light_densenet121", "light_inception_v2", "light_shufflenet")


@dataclass(frozen=True)
class ModelCase:
    name: str
    source: str
    build: object


def light_model_path(name):
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", name + ".onnx")


def materialize_light_model(name, seed=0):
    """The light model with its ConstantOfShape weights replaced by seeded initializers (see module doc)."""
    model = onnx.load(light_model_path(name))
    graph = model.graph
    rng = np.random.default_rng(seed)
    initializers = {t.name: t for t in graph.initializer}
    consumers = {}
    for node in graph.node:
        for index, name_in in enumerate(node.input):
            consumers.setdefault(name_in, []).append((node, index))
    kept_nodes = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in initializers:
            shape = tuple(int(d) for d in numpy_helper.to_array(initializers[node.input[0]]))
            role = _final_role(node.output[0], consumers)
            graph.initializer.append(numpy_helper.from_array(_weight_for_role(role, shape, rng), node.output[0]))
        else:
            kept_nodes.append(node)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    initializer_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in initializer_names]
    del graph.input[:]
    graph.input.extend(real_inputs)
    used = {name_in for node in graph.node for name_in in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    model.ir_version = IR_VERSION
    return model


def _final_role(name, consumers):
    """(op_type, input index) of the node that uses a weight, looking through Unsqueeze/Reshape."""
    users = consumers.get(name, [])
    if len(users) != 1:
        return None
    node, index = users[0]
    if node.op_type in ("Unsqueeze", "Reshape") and index == 0:
        return _final_role(node.output[0], consumers)
    return node, index


def _weight_for_role(role, shape, rng):
    op_type, index = (role[0].op_type, role[1]) if role else (None, None)
    if op_type == "Conv" and index == 1:
        return rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape).astype(np.float32)
    if op_type == "Gemm" and index == 1:
        trans_b = any(a.name == "transB" and a.i for a in role[0].attribute)
        return rng.normal(0, np.sqrt(1.0 / shape[1 if trans_b else 0]), shape).astype(np.float32)
    if (op_type == "BatchNormalization" and index in (1, 4)) or op_type == "Mul":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return rng.normal(0, 0.1, shape).astype(np.float32)


def _builder(seed):
    """foldnorm's model builder. The A/B comparison also runs this module against older builds of foldnorm,
    which may not have it: then the builder file of this checkout is loaded (it needs only numpy and onnx)."""
    try:
        from foldnorm.fold.builder import ModelBuilder
    except ImportError:
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "foldnorm", "fold",
                            "builder.py")
        spec = importlib.util.spec_from_file_location("foldnorm_model_builder", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        ModelBuilder = module.ModelBuilder
    return ModelBuilder(seed)


def conv_bn(b, x, cin, cout, kernel, stride=1, groups=1, activation="Relu", gain=1.0):
    """Conv (He-scaled, no bias) -> BatchNormalization -> activation ("Relu", "Relu6" or None)."""
    y = b.frozen_batch_norm(b.conv(x, cin, cout, kernel, stride=stride, groups=groups, gain=gain), cout)
    if activation == "Relu":
        return b.relu(y)
    if activation == "Relu6":
        return b.node("Clip", [y, b.constant(None, 0.0), b.constant(None, 6.0)])
    return y


def _image_model(b, name, output, output_shape):
    b.output(output, output_shape)
    return b.model(OPSET, IR_VERSION, name=name)


def resnet_like(input_size=224, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=1000, seed=0):
    """A ResNet-18-shaped network: basic blocks of two 3x3 conv+BN, 1x1 conv+BN shortcuts on a change."""
    b = _builder(seed)
    x = conv_bn(b, b.input("input", [1, 3, input_size, input_size]), 3, widths[0], 7, stride=2)
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = widths[0]
    for stage, (width, count) in enumerate(zip(widths, blocks)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            y = conv_bn(b, x, cin, width, 3, stride)
            y = conv_bn(b, y, width, width, 3, activation=None)
            shortcut = x if stride == 1 and cin == width else conv_bn(b, x, cin, width, 1, stride, activation=None)
            x = b.relu(b.node("Add", [y, shortcut]))
            cin = width
    return _image_model(b, "resnet_like", b.classifier(x, cin, classes), [1, classes])


MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1))


def mobilenet_like(input_size=224, blocks=MOBILENET_V2_BLOCKS, stem=32, head=1280, classes=1000, seed=0):
    """A MobileNetV2-shaped network: inverted residuals (1x1 expand, 3x3 depthwise, 1x1 project), BN after each."""
    b = _builder(seed)
    x = conv_bn(b, b.input("input", [1, 3, input_size, input_size]), 3, stem, 3, stride=2, activation="Relu6")
    cin = stem
    for expansion, width, count, first_stride in blocks:
        for block in range(count):
            stride = first_stride if block == 0 else 1
            hidden = cin * expansion
            y = conv_bn(b, x, cin, hidden, 1, activation="Relu6") if expansion != 1 else x
            y = conv_bn(b, y, hidden, hidden, 3, stride, groups=hidden, activation="Relu6")
            y = conv_bn(b, y, hidden, width, 1, activation=None)
            x = b.node("Add", [x, y]) if stride == 1 and cin == width else y
            cin = width
    x = conv_bn(b, x, cin, head, 1, activation="Relu6")
    return _image_model(b, "mobilenet_like", b.classifier(x, head, classes), [1, classes])


CHAIN_OPSET = 17
# He-scaled weights put a plain ReLU chain at the edge of chaos: over hundreds of layers the float32
# rounding differences that folding introduces (it reorders the arithmetic) can grow past verification's
# tolerance, depending on the seed. Slightly smaller weights make every layer contract them instead.
CHAIN_GAIN = 0.7


def conv_bn_chain(pairs, channels=8, size=8, seed=0):
    """`pairs` times Conv 3x3 (pad 1) -> BatchNormalization -> Relu on a 1 x channels x size x size input.

    Every layer keeps the input's shape, so the model grows by the same few KB of weights per pair and a
    fold of it should take time in proportion to `pairs`.
    """
    b = _builder(seed)
    shape = [1, channels, size, size]
    x = b.input("input", shape)
    for _ in range(pairs):
        x = conv_bn(b, x, channels, channels, 3, gain=CHAIN_GAIN)
    b.output(x, shape)
    return b.model(CHAIN_OPSET, IR_VERSION, name="conv_bn_chain_%d" % pairs)


def light_case(name):
    return ModelCase(name, "onnx package (materialized)", lambda: materialize_light_model(name))


GENERATED = [
    ModelCase("resnet_like", "generated, 1x3x224x224", resnet_like),
    ModelCase("mobilenet_like", "generated, 1x3x224x224", mobilenet_like),
]
FULL_MODELS = [light_case(n) for n in LIGHT_WITH_BATCH_NORM] + GENERATED
QUICK_MODELS = [light_case("light_resnet50")] + GENERATED
SMOKE_MODELS = [
    ModelCase("resnet_tiny", "generated, 1x3x32x32",
              lambda: resnet_like(input_size=32, widths=(8, 16), blocks=(1, 1), classes=10)),
    ModelCase("mobilenet_tiny", "generated, 1x3x32x32",
              lambda: mobilenet_like(input_size=32, blocks=((1, 8, 1, 1), (2, 16, 2, 2)), stem=8, head=32,
                                     classes=10)),
]


def parameter_bytes(model):
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


def _op_counts(model):
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _feeds(model, rng):
    initializer_names = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _fold(model, result):
    """foldnorm's fold of `model`, or None with a note in `result`."""
    try:
        from foldnorm.fold import fold_model
    except ImportError as error:
        result["notes"].append("foldnorm.fold is not available yet (%s): no folded variant" % error)
        return None
    start = time.perf_counter()
    try:
        folded, report = fold_model(model, verify=True)
    except Exception as error:  # a fold refusal is a finding to report, not a reason to stop
        result["notes"].append("fold_model failed: %s" % first_line(error))
        return None
    wall = time.perf_counter() - start
    counts = report.counts() if callable(getattr(report, "counts", None)) else {}
    result["fold"] = {
        "fold_seconds": float(getattr(report, "fold_seconds", wall)),
        "seconds_with_verify": wall,
        "param_bytes_before": int(getattr(report, "param_bytes_before", parameter_bytes(model))),
        "param_bytes_after": int(getattr(report, "param_bytes_after", parameter_bytes(folded))),
        "counts": {str(k): v for k, v in dict(counts).items()},
    }
    return folded


def _ort_basic(model, threads, directory, name):
    """onnxruntime's own basic-level optimized model, written by the session to a file."""
    import onnxruntime as ort

    path = os.path.join(directory, name + "_ort_basic.onnx")
    options = ort_session_options(threads, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    options.optimized_model_filepath = path
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(path)


def _timed_session(serialized, threads, level, repeats):
    """An onnxruntime session of the model, and the median seconds its creation took over `repeats`."""
    import onnxruntime as ort

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        session = ort.InferenceSession(serialized, ort_session_options(threads, getattr(
            ort.GraphOptimizationLevel, level)), providers=["CPUExecutionProvider"])
        seconds.append(time.perf_counter() - start)
    return session, float(np.median(seconds))


def run_model(case, threads, repeats, directory, warmup=1, session_repeats=1, settle=0.0, seed=0):
    """Time one model's variants at `threads`; returns its JSON-ready result (`skipped` if it cannot run)."""
    result = {"name": case.name, "source": case.source, "threads": threads, "notes": []}
    try:
        model = case.build()
    except (OSError, Unavailable) as error:
        result["skipped"] = "could not build the model: %s" % error
        return result
    variants = {"original": model}
    folded = _fold(model, result)
    if folded is not None:
        variants["folded"] = folded
    try:
        variants["ort_basic"] = _ort_basic(model, threads, directory, case.name)
    except Exception as error:  # onnxruntime refusing to write the model is a note, not a crash
        result["notes"].append("onnxruntime's basic-level model could not be written: %s" % first_line(error))
    result["variants"] = {
        name: {"param_bytes": parameter_bytes(m), "nodes": len(m.graph.node),
               "batch_norm_nodes": _op_counts(m).get("BatchNormalization", 0)}
        for name, m in variants.items()
    }

    feeds = _feeds(model, np.random.default_rng(seed))
    contenders, outputs = [], {}
    for name, variant in variants.items():
        serialized = variant.SerializeToString()
        for level_name, level in LEVELS.items():
            try:
                session, seconds = _timed_session(serialized, threads, level, session_repeats)
                outputs[name, level_name] = session.run(None, feeds)[0]
            except Exception as error:  # e.g. a folded model onnxruntime refuses: report it, time the rest
                result["notes"].append("%s with optimizations %s does not run: %s" % (
                    name, level_name, first_line(error)))
                continue
            result["variants"][name]["session_seconds_" + level_name] = seconds
            contenders.append(Contender("%s/%s" % (name, level_name), threads,
                                        lambda session=session: session.run(None, feeds)))
    if ("original", "disabled") not in outputs:
        result["skipped"] = "the original model does not run in onnxruntime"
        return result
    reference = outputs["original", "disabled"]
    for (name, level_name), output in outputs.items():
        error = float(np.max(np.abs(output.astype(np.float64) - reference)))
        result["variants"][name]["max_abs_diff_" + level_name] = error

    samples = measure(contenders, repeats, warmup=warmup, settle=settle)
    result["latency"] = {key.rsplit("@", 1)[0]: s.summary() for key, s in samples.items()}
    ratios = {}
    for level_name in LEVELS:
        for ratio_name, (a, b) in RATIO_PAIRS.items():
            mine, other = (samples.get("%s/%s@%d" % (v, level_name, threads)) for v in (a, b))
            if mine is not None and other is not None:
                ratios["%s/%s" % (ratio_name, level_name)] = paired_ratio(mine, other)
    result["ratios"] = ratios
    return result
