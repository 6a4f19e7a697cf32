"""One readable line from onnxruntime's and onnx.checker's errors (foldnorm/fold/messages.py), and no NumPy
warning from comparisons at extreme tolerances."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldnorm.fold.io.messages import MAX_CHARS, one_line
from foldnorm.fold.verification.tolerance import compare_output
from tests.onnx_cases import IR_VERSION


def reshape_model():
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"], name="to_rows")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 100])],
                              initializer=[numpy_helper.from_array(np.array([-1, 100], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    return model


def test_an_onnxruntime_error_loses_its_prefix_and_source_location_not_its_sense():
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(reshape_model().SerializeToString(), options, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception) as caught:
        session.run(None, {"x": np.zeros((1, 3), np.float32)})
    raw = str(caught.value)
    assert "[ONNXRuntimeError]" in raw  # what onnxruntime says, for the test to mean something
    line = one_line(caught.value)
    assert line.startswith("Reshape node 'to_rows': ") and "cannot be reshaped" in line and "{1,3}" in line
    assert "[ONNXRuntimeError]" not in line and "onnxruntime::" not in line and ".h:" not in line
    assert "was false" not in line and "\n" not in line


def test_a_checker_message_keeps_its_context_line():
    graph = helper.make_graph([helper.make_node("Conv", ["x"], ["y"], name="my_conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    with pytest.raises(onnx.checker.ValidationError) as caught:
        onnx.checker.check_model(model)
    assert "\n\n==> Context:" in str(caught.value)
    line = one_line(caught.value)
    assert "input size 1 not in range" in line and "Name: my_conv OpType: Conv" in line and "\n" not in line


def test_long_messages_are_cut_to_one_bounded_line():
    line = one_line("word " * 1000 + "\nsecond line")
    assert len(line) == MAX_CHARS and line.endswith("...")
    assert one_line(ValueError("")) == "ValueError"


@pytest.mark.parametrize("rtol, atol", [(1e308, None), (None, 1e308), (1e308, 1e308), (0.0, 0.0)])
def test_extreme_tolerances_raise_no_numpy_warning(rtol, atol):
    reference = np.array([1e38, -3e38, 0.0, np.inf, np.nan], np.float32)
    candidate = np.array([2e38, 3e38, 1e-45, np.inf, np.nan], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        comparison = compare_output("o", reference, candidate, rtol=rtol, atol=atol, noise=3e38)
    assert comparison.passed == (rtol is not None and rtol > 0 or atol is not None and atol > 0)
