"""foldnorm.verify (foldnorm/verification.py): both models in onnxruntime on the same seeded inputs, every
output compared."""
import json
import math
import types

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import foldnorm
from tests.fold.fold_models import conv_bn_model, count_ops
from foldnorm.fold import verification
from foldnorm.fold.errors import FoldError
from foldnorm.fold.verification import VerifyReport, compare_output, make_inputs, verify
from tests.onnx_cases import IR_VERSION

OPSET = 17
NP_TO_ONNX = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}


def gemm_bn_model(dtype, batch="N", features=6, channels=4, seed=0):
    """x -> Gemm(transB=1) -> BatchNormalization -> y, and Relu of the same Gemm output as a second output."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, features)).astype(dtype)
    c = rng.standard_normal(channels).astype(dtype)
    scale = rng.uniform(0.5, 1.5, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    mean = rng.standard_normal(channels).astype(dtype)
    var = rng.uniform(0.5, 2.0, channels).astype(dtype)
    elem = NP_TO_ONNX[dtype]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["gemm"], transB=1),
        helper.make_node("BatchNormalization", ["gemm", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-5),
        helper.make_node("Relu", ["gemm"], ["aux"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_bn",
        [helper.make_tensor_value_info("x", elem, [batch, features])],
        [helper.make_tensor_value_info("y", elem, None), helper.make_tensor_value_info("aux", elem, None)],
        initializer=[numpy_helper.from_array(a, n) for n, a in
                     [("w", w), ("c", c), ("scale", scale), ("bias", bias), ("mean", mean), ("var", var)]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model, (w, c, scale, bias, mean, var)


def folded_by_hand(dtype, **kwargs):
    """gemm_bn_model with the BN folded into a second Gemm in float64 here (an independent reference fold)."""
    model, (w, c, scale, bias, mean, var) = gemm_bn_model(dtype, **kwargs)
    a = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    new_w = (w.astype(np.float64) * a[:, None]).astype(dtype)
    new_c = ((c.astype(np.float64) - mean) * a + bias).astype(dtype)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["gemm"], transB=1),
        helper.make_node("Gemm", ["x", "w2", "c2"], ["y"], transB=1),
        helper.make_node("Relu", ["gemm"], ["aux"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_bn_folded",
        list(model.graph.input),
        list(model.graph.output),
        initializer=[numpy_helper.from_array(x, n) for n, x in [("w", w), ("c", c), ("w2", new_w), ("c2", new_c)]],
    )
    folded = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    folded.ir_version = IR_VERSION
    return model, folded


def run_unoptimized(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def with_offset(model, output, offset):
    """A copy of `model` whose `output` has `offset` added (an Add node before the graph output)."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for node in changed.graph.node:
        node.output[:] = [output + "_raw" if o == output else o for o in node.output]
    elem = next(o.type.tensor_type.elem_type for o in changed.graph.output if o.name == output)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    changed.graph.initializer.append(numpy_helper.from_array(np.array(offset, dtype=dtype), "offset"))
    changed.graph.node.append(helper.make_node("Add", [output + "_raw", "offset"], [output]))
    return changed


@pytest.mark.parametrize("dtype, bound", [(np.float32, 1e-5), (np.float64, 1e-12), (np.float16, 1e-2)])
def test_a_correct_fold_passes_with_small_measured_error(dtype, bound):
    original, folded = folded_by_hand(dtype)
    report = verify(original, folded, seed=3)
    assert report.passed
    assert [o.name for o in report.outputs] == ["y", "aux"]
    y, aux = report.outputs
    assert aux.max_abs_error == 0.0 and aux.passed
    assert 0.0 <= y.max_rel_error <= bound
    assert y.rtol == (1e-2 if dtype == np.float16 else 1e-4)
    assert report.input_shapes == {"x": [1, 6]}
    assert report.dynamic_dims == {"x": [0]}


def test_errors_are_measured_on_the_seeded_inputs():
    original, folded = folded_by_hand(np.float32)
    report = verify(original, folded, seed=11)
    x = np.random.default_rng(11).standard_normal((1, 6)).astype(np.float32)
    expected = run_unoptimized(original, {"x": x})[0].astype(np.float64)
    got = run_unoptimized(folded, {"x": x})[0].astype(np.float64)
    max_abs = np.abs(expected - got).max()
    assert report.outputs[0].max_abs_error == pytest.approx(max_abs, rel=1e-12, abs=0)
    assert report.outputs[0].max_rel_error == pytest.approx(max_abs / np.abs(expected).max(), rel=1e-12, abs=0)
    assert report.outputs[0].atol == pytest.approx(1e-4 * np.abs(expected).max())


def test_a_wrong_fold_fails_and_names_the_output_that_diverged():
    original, _ = gemm_bn_model(np.float32)
    wrong = with_offset(original, "y", 0.05)
    report = verify(original, wrong)
    assert not report.passed
    assert [o.name for o in report.failed_outputs] == ["y"]
    assert report.outputs[0].max_abs_error == pytest.approx(0.05, rel=1e-5)
    assert report.outputs[1].passed
    assert "DIVERGED" in report.format_text()


@pytest.mark.parametrize("factor, passes", [(0.99, False), (1.01, True)])
def test_the_tolerance_rule_is_atol_plus_rtol_times_reference(factor, passes):
    reference = np.array([0.0, 1.0, -4.0, 2.0], dtype=np.float64)
    delta = np.array([0.0, 0.0, 0.5, 0.0])
    rtol = 0.1
    # |delta| = 0.5 at |reference| = 4: the bound is atol + 0.4, so atol = 0.1 is exactly on the edge.
    comparison = compare_output("out", reference, reference + delta, rtol=rtol, atol=0.1 * factor)
    assert comparison.passed is passes
    assert comparison.max_abs_error == 0.5
    assert comparison.max_rel_error == pytest.approx(0.5 / 4.0)


def test_default_atol_follows_the_output_magnitude():
    reference = np.array([1e-9, 1000.0], dtype=np.float32)
    near_zero_error = compare_output("out", reference, np.array([5e-3, 1000.0], dtype=np.float32))
    assert near_zero_error.atol == pytest.approx(1e-4 * 1000.0)
    assert near_zero_error.passed
    too_big = compare_output("out", reference, np.array([0.2, 1000.0], dtype=np.float32))
    assert not too_big.passed


def test_nan_and_inf_compare_as_values():
    reference = np.array([np.nan, np.inf, 1.0], dtype=np.float32)
    assert compare_output("o", reference, reference.copy()).passed
    diverged = compare_output("o", reference, np.array([1.0, np.inf, 1.0], dtype=np.float32))
    assert not diverged.passed and math.isinf(diverged.max_abs_error)
    assert json.loads(json.dumps(diverged.to_dict()))["max_abs_error"] is None


def test_integer_outputs_must_match_exactly():
    reference = np.array([1, 2, 3], dtype=np.int64)
    assert compare_output("o", reference, reference.copy()).passed
    off = compare_output("o", reference, np.array([1, 2, 4], dtype=np.int64))
    assert not off.passed and off.max_abs_error == 1.0


def test_shape_or_dtype_differences_fail_with_a_note():
    reference = np.zeros((2, 3), dtype=np.float32)
    assert "shape" in compare_output("o", reference, np.zeros((3, 2), dtype=np.float32)).note
    assert "dtype" in compare_output("o", reference, np.zeros((2, 3), dtype=np.float64)).note


def test_an_output_missing_from_the_folded_model_fails():
    original, _ = gemm_bn_model(np.float32)
    folded = onnx.ModelProto()
    folded.CopyFrom(original)
    del folded.graph.output[1]
    report = verify(original, folded)
    assert not report.passed
    assert report.outputs[1].name == "aux" and "missing" in report.outputs[1].note


def test_sessions_run_with_graph_optimizations_disabled(monkeypatch):
    levels = []
    real_session = ort.InferenceSession

    def recording_session(source, options=None, **kwargs):
        levels.append(options.graph_optimization_level)
        return real_session(source, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    original, folded = folded_by_hand(np.float32)
    verify(original, folded)
    assert levels == [ort.GraphOptimizationLevel.ORT_DISABLE_ALL] * 2


def test_shapes_set_dynamic_dims_and_are_checked():
    original, folded = folded_by_hand(np.float32, features=5)
    report = verify(original, folded, shapes={"x": [3, 5]})
    assert report.passed and report.input_shapes == {"x": [3, 5]} and report.dynamic_dims == {}
    assert verify(original, folded, default_dim=2).input_shapes == {"x": [2, 5]}
    with pytest.raises(FoldError, match="'nope', which is not an input"):
        verify(original, folded, shapes={"nope": [1]})
    with pytest.raises(FoldError, match="has 3 dims; the model's input has 2"):
        verify(original, folded, shapes={"x": [1, 5, 1]})
    with pytest.raises(FoldError, match="has 4 at axis 1, where the model fixes 5"):
        verify(original, folded, shapes={"x": [1, 4]})


def test_a_dynamic_dim_beyond_the_batch_needs_a_shape():
    original, _ = gemm_bn_model(np.float32)
    original.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    message = r"input 'x' has a dynamic dim at axis 1 \('features'\); give its shape with --shape x="
    with pytest.raises(FoldError, match=message):
        verify(original, original)
    assert verify(original, original, shapes={"x": [2, 6]}).input_shapes == {"x": [2, 6]}


def test_an_input_without_shape_needs_one():
    original, _ = gemm_bn_model(np.float32)
    original.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(FoldError, match="input 'x' has no shape"):
        verify(original, original)


def test_integer_and_bool_inputs_are_generated_in_their_dtype():
    nodes = [
        helper.make_node("Gather", ["table", "indices"], ["rows"], axis=0),
        helper.make_node("Where", ["mask", "rows", "zeros"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gather_where",
        [helper.make_tensor_value_info("indices", TensorProto.INT64, [5]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [5, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "table"),
                     numpy_helper.from_array(np.zeros((5, 2), np.float32), "zeros")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    feeds, _, _ = make_inputs(model, seed=5)
    assert feeds["indices"].dtype == np.int64 and feeds["mask"].dtype == np.bool_
    assert feeds["indices"].min() >= 0 and feeds["indices"].max() < 4
    assert verify(model, model).passed


def test_initializers_listed_as_inputs_are_not_fed():
    original, _ = gemm_bn_model(np.float32)
    original.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 6]))
    feeds, _, _ = make_inputs(original)
    assert list(feeds) == ["x"]


def bfloat16_scale_model(factor):
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "k"], ["yf"]),
        helper.make_node("Cast", ["yf"], ["y"], to=TensorProto.BFLOAT16),
    ]
    graph = helper.make_graph(
        nodes,
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 8])],
        initializer=[numpy_helper.from_array(np.array(factor, np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def test_bfloat16_inputs_and_outputs_are_compared():
    report = verify(bfloat16_scale_model(2.0), bfloat16_scale_model(2.0))
    assert report.passed and report.outputs[0].dtype == "bfloat16" and report.outputs[0].rtol == 1e-2
    feeds, _, _ = make_inputs(bfloat16_scale_model(2.0), seed=0)
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32).astype(ml_dtypes.bfloat16)
    assert feeds["x"].dtype == ml_dtypes.bfloat16 and np.array_equal(feeds["x"], x)

    def scaled(factor):
        return (x.astype(np.float32) * np.float32(factor)).astype(ml_dtypes.bfloat16).astype(np.float64)

    off = verify(bfloat16_scale_model(2.0), bfloat16_scale_model(2.1))
    assert not off.passed
    assert off.outputs[0].max_abs_error == np.abs(scaled(2.1) - scaled(2.0)).max()


def test_a_model_onnxruntime_cannot_run_is_a_fold_error():
    original, _ = gemm_bn_model(np.float32)
    broken = onnx.ModelProto()
    broken.CopyFrom(original)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(FoldError, match="onnxruntime cannot run the folded model") as caught:
        verify(original, broken)
    assert "\n" not in str(caught.value)


def test_unloaded_external_data_is_refused():
    original, _ = gemm_bn_model(np.float32)
    tensor = original.graph.initializer[0]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    with pytest.raises(FoldError, match="'w' keeps its data in an external file"):
        verify(original, original)


def test_models_over_the_protobuf_limit_run_from_a_file(monkeypatch):
    sources = []
    real_session = ort.InferenceSession

    def recording_session(source, options=None, **kwargs):
        sources.append(source)
        return real_session(source, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    monkeypatch.setattr(foldnorm.fold.modelio, "PROTOBUF_LIMIT", 10)  # onnxruntime_source decides
    original, folded = folded_by_hand(np.float32)
    report = verify(original, folded)
    assert report.passed and report.outputs[0].max_abs_error > 0.0
    assert len(sources) == 2 and all(isinstance(s, str) and s.endswith("model.onnx") for s in sources)


def test_report_serializes_to_json_with_the_printed_numbers():
    original, folded = folded_by_hand(np.float32)
    report = verify(original, folded)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is True
    assert data["input_shapes"] == {"x": [1, 6]}
    assert data["dynamic_dims"] == {"x": [0]} and data["default_dim"] == 1
    assert [o["name"] for o in data["outputs"]] == ["y", "aux"]
    assert data["outputs"][0]["max_abs_error"] == report.outputs[0].max_abs_error
    text = report.format_text()
    assert "%.3g" % report.outputs[0].max_abs_error in text
    assert "dynamic dims set to 1 (x axis 0)" in text


@pytest.mark.parametrize("kwargs, error", [
    ({"rtol": -1.0}, ValueError), ({"atol": "x"}, TypeError), ({"default_dim": 0}, ValueError),
])
def test_bad_arguments_name_the_argument(kwargs, error):
    original, _ = gemm_bn_model(np.float32)
    with pytest.raises(error, match=next(iter(kwargs))):
        verify(original, original, **kwargs)


def test_sequence_outputs_are_compared_element_by_element():
    reference = [np.array([1.0, 2.0], np.float32), np.array([4.0], np.float32)]
    same = compare_output("seq", reference, [a.copy() for a in reference])
    assert same.passed and same.max_abs_error == 0.0
    off = compare_output("seq", reference, [reference[0], np.array([4.5], np.float32)])
    assert not off.passed and off.max_abs_error == 0.5 and "seq[1]" in off.note
    shorter = compare_output("seq", reference, reference[:1])
    assert not shorter.passed and "1 elements, original 2" in shorter.note


def test_the_package_exports_verify_for_a_model_folded_by_fold_model():
    assert callable(foldnorm.verify) and not isinstance(foldnorm.verify, types.ModuleType)
    assert foldnorm.verify is verification.verify and foldnorm.VerifyReport is VerifyReport
    original = conv_bn_model()
    folded, _ = foldnorm.fold_model(original, verify=False)
    assert count_ops(folded, "BatchNormalization") == 0

    report = foldnorm.verify(original, folded)
    assert isinstance(report, VerifyReport) and report.passed
    assert [o.name for o in report.outputs] == ["y"]
    assert report.input_shapes == {"x": [2, 4, 7, 6]} and report.dynamic_dims == {}
    x = np.random.default_rng(0).standard_normal((2, 4, 7, 6)).astype(np.float32)
    expected = run_unoptimized(original, {"x": x})[0].astype(np.float64)
    got = run_unoptimized(folded, {"x": x})[0].astype(np.float64)
    (y,) = report.outputs
    assert y.max_abs_error == pytest.approx(np.abs(expected - got).max(), rel=1e-12, abs=0)
    assert y.rtol == 1e-4 and y.atol == pytest.approx(1e-4 * np.abs(expected).max())
    assert 0.0 < y.max_abs_error < y.atol
