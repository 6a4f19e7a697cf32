"""Quantized (QDQ) models: what foldnorm folds, how close the result stays, and onnxruntime's latency
before and after.

    python -m benchmarks.quantized [--quick | --smoke] [--out TABLE.md] [--json RESULTS.json] [--threads N]

The float models are the generated ResNet-18-shaped and MobileNetV2-shaped CNNs of benchmarks.models and a
small decoder with ConvTranspose+BatchNormalization; onnxruntime.quantization.quantize_static turns each
into a QDQ model (int8 weights, uint8 activations, seeded random calibration data), per channel and per
tensor. Two shapes of quantized graph per model:

- ptq: the quantizer's output on the unfolded model: each BN reads a QuantizeLinear -> DequantizeLinear
  pair after its layer. Folded without the switch (every such BN becomes Mul/Add) and with
  fold_through_qdq (the pair is dropped: close, not exact);
- qat: the shape of a quantization-aware-trained export: the same model with the pair between each layer
  and its BN removed (DequantizeLinear(weight) -> layer -> BN -> Q -> DQ). Folded exactly, no switch.

Per row: BNs in the model; folded exactly / folded with a stated error (through a Q/DQ pair, or a channel
requantized) / left (rewritten to Mul/Add or kept); the largest output difference from the original in
quantization steps of the output (foldnorm's verification, onnxruntime with optimizations disabled);
integer Convs (QLinearConv) in onnxruntime's optimized graph before -> after; and the median latency of
the original and the folded model at ORT_ENABLE_ALL, timed interleaved.
"""
import argparse
import json
import sys

import numpy as np
import onnx

from foldnorm.fold.builder import ModelBuilder

from .harness import Contender, measure, paired_ratio
from .kernels import ort_session_options
from .models import conv_bn, mobilenet_like, resnet_like

CALIBRATION_BATCHES = 4
MODES = {
    "full": {"size": 224, "repeats": 30},
    "quick": {"size": 112, "repeats": 10},
    "smoke": {"size": 32, "repeats": 2},
}


def decoder(input_size=56, seed=0):
    """Conv+BN+ReLU, then two ConvTranspose (stride 2) + BN (+ReLU): an upsampling head."""
    b = ModelBuilder(seed)
    x = conv_bn(b, b.input("input", [1, 16, input_size, input_size]), 16, 32, 3)
    for cin, cout, relu in ((32, 16, True), (16, 8, False)):
        weight = b.rng.normal(0, np.sqrt(2.0 / (cin * 4)), (cin, cout, 2, 2))
        x = b.node("ConvTranspose", [x, b.constant(None, weight), b.constant(None, np.zeros(cout))],
                   kernel_shape=[2, 2], strides=[2, 2])
        x = b.frozen_batch_norm(x, cout)
        if relu:
            x = b.relu(x)
    b.output(x, [1, 8, 4 * input_size, 4 * input_size])
    return b.model(opset=13, name="decoder")


NETWORKS = {"resnet18": resnet_like, "mobilenet_v2": mobilenet_like, "decoder": decoder}


def _input_shape(model):
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def quantize(model, per_channel, seed=0):
    """quantize_static's QDQ model of `model` (int8 weights, uint8 activations)."""
    import tempfile
    from pathlib import Path

    from onnxruntime import quantization

    shape = _input_shape(model)
    name = model.graph.input[0].name

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self.batches = iter([{name: rng.standard_normal(shape).astype(np.float32)}
                                 for _ in range(CALIBRATION_BATCHES)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="foldnorm-quantized-") as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "qdq.onnx"
        onnx.save(model, str(source))
        quantization.quantize_static(str(source), str(target), Calibration(),
                                     quant_format=quantization.QuantFormat.QDQ, per_channel=per_channel,
                                     weight_type=quantization.QuantType.QInt8,
                                     activation_type=quantization.QuantType.QUInt8)
        return onnx.load(str(target))


def qat_shape(model):
    """A copy of a QDQ model without the QuantizeLinear -> DequantizeLinear pair between each layer and
    the BatchNormalization that reads it: the graph a quantization-aware-trained export has."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    dropped = set()
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            continue
        dq = producers.get(node.input[0])
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or readers[dq.output[0]] != 1 or readers[q.output[0]] != 1:
            continue
        node.input[0] = q.input[0]
        dropped.update((id(q), id(dq)))
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return result


def optimized_ops(model, threads):
    import os
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="foldnorm-quantized-") as folder:
        options = ort_session_options(threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def tally(report):
    """(BNs, folded exactly, folded with a stated error, left) of a FoldReport."""
    outcomes = report.normalizations()
    exact = sum(1 for o in outcomes if o.action == "folded" and (o.quantized is None or o.quantized.exact))
    inexact = sum(1 for o in outcomes if o.action == "folded" and o.quantized is not None and not o.quantized.exact)
    return len(outcomes), exact, inexact, len(outcomes) - exact - inexact


def run_case(name, model, threads, repeats, fold_through_qdq):
    """One row: fold, verify, count integer Convs, time before and after."""
    import onnxruntime as ort

    from foldnorm.fold import fold_model
    from foldnorm.fold.errors import VerificationError

    row = {"case": name, "fold_through_qdq": fold_through_qdq}
    try:
        folded, report = fold_model(model, fold_through_qdq=fold_through_qdq)
        row["verified"] = True
    except VerificationError as error:
        report, folded, row["verified"] = error.report, None, False
    row["bns"], row["exact"], row["with_error"], row["left"] = tally(report)
    outputs = report.verification.outputs
    row["max_steps"] = max((getattr(o, "max_steps", 0.0) for o in outputs), default=0.0)
    layer_steps = [o.layer_steps for o in outputs if getattr(o, "layer_steps", None) is not None]
    row["layer_steps"] = max(layer_steps) if layer_steps else None
    row["weight_steps"] = max((o.quantized.weight_steps for o in report.normalizations() if o.quantized), default=0.0)
    if folded is None:
        return row
    before, after = optimized_ops(model, threads), optimized_ops(folded, threads)
    row["integer_convs"] = [before.count("QLinearConv"), after.count("QLinearConv")]
    row["float_bns_after"] = after.count("BatchNormalization")
    x = np.random.default_rng(1).standard_normal(_input_shape(model)).astype(np.float32)
    feeds = {model.graph.input[0].name: x}
    contenders = []
    for label, variant in (("original", model), ("folded", folded)):
        session = ort.InferenceSession(variant.SerializeToString(),
                                       ort_session_options(threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                                       providers=["CPUExecutionProvider"])
        contenders.append(Contender(label, threads, lambda session=session: session.run(None, feeds)))
    samples = measure(contenders, repeats, warmup=2)
    original, folded_samples = samples["original@%d" % threads], samples["folded@%d" % threads]
    row["latency_ms"] = [1e3 * original.summary()["median"], 1e3 * folded_samples.summary()["median"]]
    row["ratio"] = paired_ratio(folded_samples, original)
    return row


def cases(size):
    """(name, QDQ model, fold_through_qdq) for every row."""
    for net, build in NETWORKS.items():
        model = build(input_size=size // 4 if net == "decoder" else size)
        for per_channel in (True, False):
            ptq = quantize(model, per_channel)
            granularity = "per_channel" if per_channel else "per_tensor"
            yield "%s_qat_%s" % (net, granularity), qat_shape(ptq), False
            yield "%s_ptq_%s" % (net, granularity), ptq, False
            yield "%s_ptq_%s" % (net, granularity), ptq, True


def markdown(rows, threads, size):
    lines = [
        "| case | switch | BNs | folded exactly | folded, stated error | left | max diff, output steps: end to end "
        "(layer by layer) | QLinearConv before -> after | latency before -> after (ms) | after / before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        switch = "--fold-through-qdq" if row["fold_through_qdq"] else "-"
        convs = "%d -> %d" % tuple(row["integer_convs"]) if "integer_convs" in row else "n/a"
        latency = "%.2f -> %.2f" % tuple(row["latency_ms"]) if "latency_ms" in row else "not timed"
        ratio = "%.3f" % row["ratio"]["median"] if "ratio" in row else "n/a"
        steps = "%g" % row["max_steps"]
        if row["layer_steps"] is not None:
            steps += " (%g)" % row["layer_steps"]
        if not row["verified"]:
            steps += ", FAILED verification"
        lines.append("| %s | %s | %d | %d | %d | %d | %s | %s | %s | %s |" % (
            row["case"], switch, row["bns"], row["exact"], row["with_error"], row["left"], steps, convs, latency,
            ratio))
    lines.append("")
    lines.append("onnxruntime %s, ORT_ENABLE_ALL, %d thread(s), batch 1, input %dx%d (decoder %dx%d); median of "
                 "interleaved runs. \"left\" BNs are rewritten as Mul/Add. The layer-by-layer difference is "
                 "measured only when the end-to-end one is beyond the tolerance (1 step for exact folds, 3 "
                 "otherwise)." % (_ort_version(), threads, size, size, size // 4, size // 4))
    return "\n".join(lines)


def _ort_version():
    import onnxruntime

    return onnxruntime.__version__


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quantized", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                      help="tiny inputs, 2 repetitions: checks that everything runs; the numbers mean nothing")
    parser.add_argument("--out", help="also write the Markdown table here")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--cases", default=None, help="only cases whose name contains one of these (comma-separated)")
    args = parser.parse_args(argv)
    settings = MODES[args.mode or "full"]
    from .harness import default_threads

    threads = args.threads or max(default_threads())
    wanted = [c for c in (args.cases or "").split(",") if c]
    rows = []
    for name, model, through in cases(settings["size"]):
        if wanted and not any(w in name for w in wanted):
            continue
        print("benchmarks.quantized: %s%s" % (name, " --fold-through-qdq" if through else ""), file=sys.stderr,
              flush=True)
        rows.append(run_case(name, model, threads, settings["repeats"], through))
    table = markdown(rows, threads, settings["size"])
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
