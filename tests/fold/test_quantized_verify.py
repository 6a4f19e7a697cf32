"""Verification of quantized models in quantization steps: end to end, and layer by layer where one-step
flips compound through a deep network; and the quantized-model benchmark's smoke run."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import quantized as bench
from foldnorm.fold import fold_model
from foldnorm.fold.quantized.steps import compare_in_steps, output_steps
from foldnorm.fold.verification.runner import verify
from tests.onnx_cases import run_ort

pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def deep_qat():
    """A ResNet-18-shaped network (32x32 input), quantized per channel, in the quantization-aware shape."""
    return bench.qat_shape(bench.quantize(bench.resnet_like(input_size=32), per_channel=True))


def run_all(model, feeds, names):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in names)
    return run_ort(copy, feeds)


def test_exact_folds_of_a_deep_network_pass_layer_by_layer(deep_qat):
    folded, report = fold_model(deep_qat)
    assert all(o.action == "folded" and o.quantized.exact for o in report.normalizations())
    (comparison,) = report.verification.outputs
    assert comparison.passed and comparison.step_tolerance == 1.0
    # the flips compound end to end ...
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    last = next(n for n in deep_qat.graph.node if n.output[0] == deep_qat.graph.output[0].name)
    step = float(numpy_helper.to_array(next(t for t in deep_qat.graph.initializer if t.name == last.input[1])))
    first_q = next(n for n in deep_qat.graph.node if n.op_type == "QuantizeLinear" and n.input[0] != "input")
    original, new = run_all(deep_qat, feeds, [first_q.output[0]]), run_all(folded, feeds, [first_q.output[0]])
    name = deep_qat.graph.output[0].name
    end_to_end = float(np.abs(new[name].astype(np.float64) - original[name]).max() / step)
    assert end_to_end > 1.0 and comparison.max_steps == pytest.approx(end_to_end, abs=1e-3)
    # ... while the first folded layer, which reads the same input in both, is within one step
    first = np.abs(new[first_q.output[0]].astype(int) - original[first_q.output[0]].astype(int)).max()
    assert first <= 1
    assert comparison.layer_steps == 1.0


def test_a_wrong_scale_deep_in_the_network_fails_layer_by_layer(deep_qat):
    folded, _ = fold_model(deep_qat, verify=False)
    scales = [t for t in folded.graph.initializer if t.name.endswith("_folded_weight_scale")]
    target = scales[len(scales) // 2]
    values = numpy_helper.to_array(target).copy()
    values *= 1.3
    target.CopyFrom(numpy_helper.from_array(values, target.name))
    result = verify(deep_qat, folded)
    (comparison,) = result.outputs
    assert not result.passed and comparison.layer_steps > 1.0
    assert "with the original's inputs to every layer" in comparison.note


def test_integer_outputs_are_compared_in_steps():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, [4]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(np.float32(0.5), "s"), numpy_helper.from_array(np.uint8(10), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    steps = output_steps(model)
    assert steps["q"] == 1.0 and steps["y"] == 0.5
    reference = np.array([10, 11, 12, 13], np.uint8)
    result = compare_in_steps("q", reference, np.array([10, 13, 12, 13], np.uint8), steps["q"], 1.0)
    assert not result.passed and result.max_steps == 2.0
    result = compare_in_steps("y", reference * np.float32(0.5), np.array([5, 6, 6, 6.5], np.float32), 0.5, 1.0)
    assert result.passed and result.max_steps == 1.0


def test_benchmark_smoke_run(tmp_path):
    table, rows = tmp_path / "table.md", tmp_path / "rows.json"
    assert bench.main(["--smoke", "--cases", "decoder_qat", "--out", str(table), "--json", str(rows)]) == 0
    written = json.loads(rows.read_text())
    assert [r["case"] for r in written] == ["decoder_qat_per_channel", "decoder_qat_per_tensor"]
    for row in written:
        assert (row["bns"], row["exact"], row["with_error"], row["left"]) == (3, 3, 0, 0)
        assert row["verified"] and row["max_steps"] <= 1.0
        assert row["integer_convs"] == [0, 1]  # the Conv's BN blocked onnxruntime's integer Conv
    assert "| decoder_qat_per_channel | - | 3 | 3 | 0 | 0 |" in table.read_text()
