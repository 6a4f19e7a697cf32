"""foldnorm.verify (foldnorm/verification.py): both models in onnxruntime on the same seeded inputs, every
output compared."""
import json
import math
import stat
import sys
import types

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import foldnorm
from tests.fold.fold_models import conv_bn_model, count_ops
from foldnorm.cli import CLI_WORDS
from foldnorm.fold.verification import runner as verification
from foldnorm.fold.verification import sessions
from foldnorm.fold.errors import FoldError, VerifierCrashed
from foldnorm.fold.verification import isolated
from foldnorm.fold.verification.shapes import ShapeError
from foldnorm.fold.verification.runner import VerifyReport, compare_output, make_inputs, verify
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


def run_unoptimized(model, feeds, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def model_noise(model, feeds, output=0):
    """max |optimized - plain| of onnxruntime's two runs of `model` (the model's own rounding noise)."""
    plain = run_unoptimized(model, feeds)[output].astype(np.float64)
    optimized = run_unoptimized(model, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)[output]
    return float(np.abs(optimized.astype(np.float64) - plain).max())


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
    assert report.shape_sets == [{"x": [1, 6]}, {"x": [2, 6]}]
    assert report.dynamic_dims == {"x": [0]} and report.shapes_chosen


def test_errors_are_measured_on_the_seeded_inputs_at_both_shapes():
    original, folded = folded_by_hand(np.float32)
    report = verify(original, folded, seed=11)
    errors, relative, tolerances = [], [], []
    for seed, batch in ((11, 1), (12, 2)):
        x = np.random.default_rng(seed).standard_normal((batch, 6)).astype(np.float32)
        expected = run_unoptimized(original, {"x": x})[0].astype(np.float64)
        got = run_unoptimized(folded, {"x": x})[0].astype(np.float64)
        errors.append(np.abs(expected - got).max())
        relative.append(errors[-1] / np.abs(expected).max())
        tolerances.append(max(1e-4 * np.abs(expected).max(), 4.0 * model_noise(original, {"x": x})))
    assert report.outputs[0].max_abs_error == pytest.approx(max(errors), rel=1e-12, abs=0)
    assert report.outputs[0].max_rel_error == pytest.approx(max(relative), rel=1e-12, abs=0)
    assert report.outputs[0].atol == pytest.approx(max(tolerances))


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
    # the original and the folded model without optimizations; the original with them, for its noise
    assert levels == [ort.GraphOptimizationLevel.ORT_DISABLE_ALL] * 2 + [ort.GraphOptimizationLevel.ORT_ENABLE_ALL]


def test_shapes_set_dynamic_dims_and_are_checked():
    original, folded = folded_by_hand(np.float32, features=5)
    report = verify(original, folded, shapes={"x": [3, 5]})
    assert report.passed and report.input_shapes == {"x": [3, 5]} and report.dynamic_dims == {}
    assert verify(original, folded).shape_sets == [{"x": [1, 5]}, {"x": [2, 5]}]
    with pytest.raises(FoldError, match="'nope', which is not an input"):
        verify(original, folded, shapes={"nope": [1]})
    with pytest.raises(FoldError, match="has 3 dims; the model's input has 2"):
        verify(original, folded, shapes={"x": [1, 5, 1]})
    with pytest.raises(FoldError, match="has 4 at axis 1, where the model fixes 5"):
        verify(original, folded, shapes={"x": [1, 4]})


def test_a_dynamic_feature_dim_takes_the_size_the_weights_fix():
    original, folded = folded_by_hand(np.float32, features=6)
    for model in (original, folded):
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    report = verify(original, folded)
    assert report.passed and report.dynamic_dims == {"x": [0, 1]}
    # no ladder size runs a Gemm whose weight has 6 columns; 6 is read off the model's initializers
    assert report.shape_sets == [{"x": [1, 6]}, {"x": [2, 6]}]
    assert verify(original, folded, shapes={"x": [3, 6]}).shape_sets == [{"x": [3, 6]}]


def test_no_shape_that_runs_is_refused_with_onnxruntimes_reason():
    original, _ = gemm_bn_model(np.float32)
    original.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    original.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((4, 1031), np.float32), "w"))
    with pytest.raises(ShapeError) as caught:
        verify(original, original)
    message = str(caught.value)
    assert "runs the original model at none of the" in message and "x=[1,224]" in message
    assert "Gemm node" in message and "shapes=" in message and "\n" not in message
    assert "[ONNXRuntimeError]" not in message and ".cc:" not in message and ".h:" not in message
    assert "--shape x=" not in message and "--shape NAME=" in caught.value.worded(CLI_WORDS)


def test_an_input_without_shape_needs_one():
    original, _ = gemm_bn_model(np.float32)
    original.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(ShapeError, match=r"input 'x' declares no shape, not even its rank; give its shape with "
                                         r"shapes=\{'x': \[d0, d1, ...\]\}") as caught:
        verify(original, original)
    assert "--shape x=d0,d1,..." in caught.value.worded(CLI_WORDS) and caught.value.input == "x"


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


def test_an_original_onnxruntime_cannot_load_is_a_fold_error():
    original, _ = gemm_bn_model(np.float32)
    broken = onnx.ModelProto()
    broken.CopyFrom(original)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(FoldError, match="onnxruntime cannot load the original model: .*NoSuchOp") as caught:
        verify(broken, original)
    assert "\n" not in str(caught.value) and "[ONNXRuntimeError]" not in str(caught.value)


def test_a_folded_model_onnxruntime_cannot_load_fails_verification():
    original, _ = gemm_bn_model(np.float32)
    broken = onnx.ModelProto()
    broken.CopyFrom(original)
    broken.graph.node[0].op_type = "NoSuchOp"
    report = verify(original, broken)
    assert not report.passed and all(not o.passed for o in report.outputs)
    assert "onnxruntime cannot load the folded model" in report.outputs[0].note


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
    monkeypatch.setattr(foldnorm.fold.io.modelio, "PROTOBUF_LIMIT", 10)  # onnxruntime_source decides
    original, folded = folded_by_hand(np.float32)
    report = verify(original, folded)
    assert report.passed and report.outputs[0].max_abs_error > 0.0
    assert len(sources) == 3 and all(isinstance(s, str) and s.endswith("model.onnx") for s in sources)


def test_report_serializes_to_json_with_the_printed_numbers():
    original, folded = folded_by_hand(np.float32)
    report = verify(original, folded)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is True
    assert data["input_shapes"] == {"x": [1, 6]}
    assert data["shape_sets"] == [{"x": [1, 6]}, {"x": [2, 6]}] and data["shapes_chosen"] is True
    assert data["dynamic_dims"] == {"x": [0]} and data["noise_factor"] == 4.0
    assert [o["name"] for o in data["outputs"]] == ["y", "aux"]
    assert data["outputs"][0]["max_abs_error"] == report.outputs[0].max_abs_error
    text = report.format_text()
    assert "%.3g" % report.outputs[0].max_abs_error in text
    assert data["outputs"][0]["noise"] == report.outputs[0].noise is not None
    assert "x=[1,6]" in text and "x=[2,6]" in text and "chosen by foldnorm (x axis 0)" in text
    assert "model noise" in text and "%.3g" % report.outputs[0].noise in text


@pytest.mark.parametrize("kwargs, error", [
    ({"rtol": -1.0}, ValueError), ({"atol": "x"}, TypeError), ({"shapes": [1, 6]}, TypeError),
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
    assert foldnorm.verify is isolated.verify is foldnorm.fold.verification.verify  # in a process of its own
    assert foldnorm.VerifyReport is VerifyReport
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
    noise = model_noise(original, {"x": x})
    assert y.noise == pytest.approx(noise, rel=1e-12, abs=0)
    assert y.rtol == 1e-4 and y.atol == pytest.approx(max(1e-4 * np.abs(expected).max(), 4.0 * noise))
    assert 0.0 < y.max_abs_error < y.atol


@pytest.mark.parametrize("given", ["file", "memory"])
def test_a_crash_of_onnxruntime_in_verify_is_an_exception_naming_the_model_and_the_signal(tmp_path, monkeypatch,
                                                                                         given):
    original = conv_bn_model()
    folded, _ = foldnorm.fold_model(original, verify=False)
    path = tmp_path / "model.onnx"
    onnx.save_model(original, str(path))
    # The verifying process dies by a real segmentation fault where onnxruntime would run.
    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crashing.chmod(crashing.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(crashing))
    model = path if given == "file" else original
    with pytest.raises(VerifierCrashed) as caught:
        foldnorm.verify(model, folded)
    name = str(path) if given == "file" else "<in-memory model>"
    assert str(caught.value) == "verifying %s: the verifying process (onnxruntime) was killed by SIGSEGV" % name
    assert caught.value.model == name and caught.value.signal == "SIGSEGV"
    monkeypatch.undo()
    assert foldnorm.verify(model, folded).passed  # this process lives on, and verifies for real


def test_verify_checks_its_options_before_starting_a_process(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a verifying process was started")

    monkeypatch.setattr(isolated, "Verifier", refuse)
    model = conv_bn_model()
    with pytest.raises(ValueError, match="rtol must be a finite non-negative number"):
        foldnorm.verify(model, model, rtol=-1.0)
    with pytest.raises(TypeError, match="shapes must be a dict"):
        foldnorm.verify(model, model, shapes=[1, 2])
    with pytest.raises(TypeError, match="folded must be an onnx.ModelProto or a path, got int"):
        foldnorm.verify(model, 3)


def sigmoid_head_model(seed=0, channels=8, in_channels=16):
    """x + 3e4 -> Conv (each filter sums to 0, so the offset cancels) -> BN -> Sigmoid, outputs near 4e-6.

    The large terms that cancel in the Conv make its output's rounding noise large next to what is left,
    and the Sigmoid near 0 keeps that noise relative: the model's own arithmetic, in any evaluation order
    (onnxruntime's optimized run included), moves its outputs far beyond a default 1e-4 relative tolerance.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, in_channels, 3, 3)).astype(np.float32)
    w -= w.mean(axis=(1, 2, 3), keepdims=True)
    params = dict(offset=np.array(3e4, np.float32), w=w,
                  scale=rng.uniform(0.03, 0.06, channels).astype(np.float32),
                  bias=np.full(channels, -12.4, np.float32),
                  mean=rng.standard_normal(channels).astype(np.float32),
                  var=rng.uniform(0.5, 2.0, channels).astype(np.float32))
    nodes = [helper.make_node("Add", ["x", "offset"], ["shifted"]),
             helper.make_node("Conv", ["shifted", "w"], ["conv"]),
             helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"], ["bn"]),
             helper.make_node("Sigmoid", ["bn"], ["y"])]
    graph = helper.make_graph(nodes, "sigmoid_head",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_channels, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, "H2", "W2"])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def test_a_model_with_large_rounding_noise_passes_within_its_noise():
    original = sigmoid_head_model()
    folded, _ = foldnorm.fold_model(original, verify=False)
    report = verify(original, folded)
    (y,) = report.outputs
    assert report.passed, report.format_text()
    x = np.random.default_rng(0).standard_normal((1, 16, 224, 224)).astype(np.float32)
    expected = run_unoptimized(original, {"x": x})[0].astype(np.float64)
    assert 1e-6 < np.median(expected) < 1e-5  # outputs of a few 1e-6, as a detector's sigmoid head near 0
    # the default tolerance alone would call this correct fold diverged: the noise floor is what passes it
    assert y.max_abs_error > 1e-4 * np.abs(expected).max()
    assert y.noise >= model_noise(original, {"x": x}) > 0.0
    assert y.max_abs_error <= y.atol == pytest.approx(verification.NOISE_FACTOR * y.noise)


def wrong_channel_fold(monkeypatch, factor, channel=3):
    """fold_into_conv with channel `channel` of the folded weight scaled by `factor` (a wrong channel scale)."""
    from foldnorm.fold.core import absorb

    real = absorb.fold_into_conv

    def corrupted(weight, bias, affine, group):
        new_weight, new_bias = real(weight, bias, affine, group)
        new_weight = np.array(new_weight)  # an array of its own (the fold may return one computed when read)
        new_weight[channel] *= new_weight.dtype.type(factor)
        return new_weight, new_bias

    monkeypatch.setattr(absorb, "fold_into_conv", corrupted)


@pytest.mark.parametrize("build, factor", [(sigmoid_head_model, 1.1), (conv_bn_model, 1.01)])
def test_one_wrong_channel_scale_still_fails(monkeypatch, build, factor):
    original = build()
    wrong_channel_fold(monkeypatch, factor)
    wrong, _ = foldnorm.fold_model(original, verify=False)
    report = verify(original, wrong)
    assert not report.passed
    (y,) = report.outputs
    assert y.noise is not None and y.max_abs_error > verification.NOISE_FACTOR * y.noise
    monkeypatch.undo()
    right, _ = foldnorm.fold_model(original, verify=False)
    assert verify(original, right).passed


def test_the_noise_is_reported_and_unmeasured_noise_is_said(monkeypatch):
    original, folded = folded_by_hand(np.float32)
    real_session = sessions.ModelSource.session

    def no_optimized_session(source, label, *, optimized):
        if optimized:
            raise FoldError("onnxruntime cannot load the %s model: simulated" % label)
        return real_session(source, label, optimized=optimized)

    monkeypatch.setattr(sessions.ModelSource, "session", no_optimized_session)
    report = verify(original, folded)
    assert report.passed and all(o.noise is None for o in report.outputs)
    assert any("noise was not measured" in note for note in report.notes)
    assert "noise was not measured" in report.format_text()


def test_a_large_models_noise_is_measured_only_when_an_output_needs_it(monkeypatch):
    monkeypatch.setattr(verification, "NOISE_ALWAYS_BYTES", 0)  # every model counts as large
    original, folded = folded_by_hand(np.float32)
    quiet = verify(original, folded)
    assert quiet.passed and all(o.noise is None for o in quiet.outputs)
    assert any("noise was not measured" in note for note in quiet.notes)
    noisy = sigmoid_head_model()
    noisy_folded, _ = foldnorm.fold_model(noisy, verify=False)
    report = verify(noisy, noisy_folded)
    assert report.passed and report.outputs[0].noise > 0.0 and not report.notes
