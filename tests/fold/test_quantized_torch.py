"""Post-training-quantized models: unfolded torch models (BN kept: training=PRESERVE) quantized by
onnxruntime.quantization.quantize_static (QDQ, per-channel and per-tensor), folded with and without
fold_through_qdq, checked against onnxruntime on the quantized original in quantization steps."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from foldnorm.fold import fold_model
from tests.onnx_cases import run_ort

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.bn3 = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = torch.relu(self.bn2(self.depthwise(x)))
        return self.bn3(self.up(x))


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 10)
        self.bn = torch.nn.BatchNorm1d(10)

    def forward(self, x):
        return self.bn(self.fc(x))


CASES = {"convnet": (ConvNet, (1, 3, 12, 12)), "mlp": (Mlp, (4, 12))}


class Calibration(quantization.CalibrationDataReader):
    def __init__(self, shape):
        self.batches = iter([{"x": np.random.default_rng(i).standard_normal(shape).astype(np.float32)}
                             for i in range(8)])

    def get_next(self):
        return next(self.batches, None)


def quantized_model(tmp_path, case, per_channel):
    torch.manual_seed(0)
    module, shape = CASES[case]
    net = module()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        with torch.no_grad():  # spread-out statistics and signs, so every BN is a real map
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    net.eval()
    float_path, quantized_path = tmp_path / "float.onnx", tmp_path / "quantized.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's deprecation notices
        torch.onnx.export(net, (torch.randn(shape),), str(float_path), dynamo=False, opset_version=13,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
                          input_names=["x"], output_names=["y"])
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(float_path)).graph.node) > 0
    quantization.quantize_static(str(float_path), str(quantized_path), Calibration(shape),
                                 quant_format=quantization.QuantFormat.QDQ, per_channel=per_channel,
                                 weight_type=quantization.QuantType.QInt8,
                                 activation_type=quantization.QuantType.QUInt8)
    return onnx.load(str(quantized_path)), shape


def optimized_ops(model, tmp_path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def output_steps(original, folded, shape):
    """The largest difference of the output, in steps of its final DequantizeLinear, on fresh inputs."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    last = next(n for n in original.graph.node if n.output[0] == "y")
    assert last.op_type == "DequantizeLinear"
    step = float(inits[last.input[1]])
    feeds = {"x": np.random.default_rng(99).standard_normal(shape).astype(np.float32)}
    results = [run_ort(m, feeds)["y"] for m in (original, folded)]
    return float(np.abs(results[1].astype(np.float64) - results[0]).max() / step)


def weights_from_integers(model):
    """Every layer's weight is DequantizeLinear of an int8 initializer."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_static_models_with_and_without_the_switch(tmp_path, case, per_channel):
    model, shape = quantized_model(tmp_path, case, per_channel)
    bns = sum(n.op_type == "BatchNormalization" for n in model.graph.node)

    kept, report = fold_model(model)
    assert [o.action for o in report.normalizations()] == ["left"] * bns
    assert all("fold_through_qdq=True" in o.reason for o in report.normalizations())
    assert report.verification.passed and output_steps(model, kept, shape) <= 1.0

    folded, report = fold_model(model, fold_through_qdq=True)
    outcomes = report.normalizations()
    assert [o.action for o in outcomes] == ["folded"] * bns
    assert all(o.quantized.through_qdq and o.quantized.weight == "int8" for o in outcomes)
    expected = "per-channel" if per_channel else "per-tensor -> per-channel"
    assert all(o.quantized.granularity == expected for o in outcomes)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    onnx.checker.check_model(folded, full_check=True)
    weights_from_integers(folded)
    (comparison,) = report.verification.outputs
    assert comparison.step_tolerance == 3.0 and comparison.max_steps <= 3.0
    assert output_steps(model, folded, shape) <= 3.0

    before, after = optimized_ops(model, tmp_path), optimized_ops(folded, tmp_path)
    assert "BatchNormalization" not in after
    if case == "convnet":  # both Convs run as onnxruntime's integer Conv
        assert after.count("QLinearConv") == 2 and before.count("QLinearConv") == 2
