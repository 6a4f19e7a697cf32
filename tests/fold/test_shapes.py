"""Input shapes for verification (foldnorm/fold/shapes.py): dynamic dims get sizes onnxruntime runs, at two
different shapes; invalid and huge dims are refused with a sentence, never a MemoryError."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldnorm.cli import CLI_WORDS
from foldnorm.fold.verification import shapes
from foldnorm.fold.errors import FoldError
from foldnorm.fold.verification.shapes import INPUT_BYTES_LIMIT, ShapeError, Symbol, input_specs
from foldnorm.fold.verification.runner import make_inputs, verify
from tests.onnx_cases import IR_VERSION

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              initializer=[numpy_helper.from_array(a, n) for n, a in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    return model


def image_model(dims, stride=1):
    """x (dims) -> Conv(3->4, 3x3, stride) -> y."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    return make_model([helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride, stride], pads=[1, 1, 1, 1])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [("w", w)])


def declared_as(model, values):
    """A copy of `model` whose input 'x' declares dim_value values[i] at axis i (None: leave the axis)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for dim, value in zip(copy.graph.input[0].type.tensor_type.shape.dim, values):
        if value is not None:
            dim.Clear()
            dim.dim_value = value
    return copy


def run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_dynamic_batch_and_spatial_dims_get_two_different_shapes():
    model = image_model(["batch", 3, "height", "width"])
    report = verify(model, model)
    assert report.passed and report.dynamic_dims == {"x": [0, 2, 3]}
    first, second = report.shape_sets
    assert first == {"x": [1, 3, 224, 224]}
    assert second["x"][0] != 1 and second["x"][2] != 224 and second["x"][2] == second["x"][3]


@pytest.mark.parametrize("value", [0, -1])
def test_zero_and_minus_one_dims_are_dynamic(value):
    model = declared_as(image_model(["n", 3, "h", "w"]), [value, None, value, value])
    report = verify(model, model)
    assert report.passed and report.dynamic_dims == {"x": [0, 2, 3]}
    assert report.input_shapes == {"x": [1, 3, 224, 224]}


def test_a_dim_without_value_or_name_is_dynamic():
    model = image_model(["n", 3, "h", "w"])
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.Clear()
    assert verify(model, model).dynamic_dims == {"x": [0, 2, 3]}


def test_other_negative_dims_are_invalid_not_dynamic():
    model = declared_as(image_model(["n", 3, "h", "w"]), [None, -5])
    with pytest.raises(ShapeError, match=r"input 'x' declares dim -5 at axis 1, which is invalid") as caught:
        verify(model, model)
    assert "dynamic" not in str(caught.value).split("which is invalid")[0]
    assert "--shape x=" in caught.value.worded(CLI_WORDS)
    assert verify(model, model, shapes={"x": [1, 3, 8, 8]}).passed


def test_one_dim_name_takes_one_size_in_every_input():
    model = make_model([helper.make_node("Add", ["a", "b"], ["y"])],
                       [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "T"]),
                        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "T"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    report = verify(model, model)
    for shape_set in report.shape_sets:
        assert shape_set["a"] == shape_set["b"]
    specs = input_specs(model, {"a": [3, 5]})
    assert specs[1].dims == (3, 5)  # the sizes given for 'a' bind N and T in 'b'
    with pytest.raises(FoldError, match="dim 'T' to both 5 and 6"):
        input_specs(model, {"a": [3, 5], "b": [3, 6]})


def test_roles_batch_for_axis_zero_size_for_the_rest():
    model = image_model(["batch", 3, "side", "side"])
    (spec,) = input_specs(model, {})
    assert spec.dims == (Symbol("batch", "batch"), 3, Symbol("side", "size"), Symbol("side", "size"))


def test_a_model_that_needs_a_multiple_of_32_and_a_fixed_size_after_striding():
    """Five stride-2 Convs then a Reshape to a fixed 7x7 grid: only a 224 input (or near it) runs."""
    rng = np.random.default_rng(1)
    nodes, inits, x = [], [], "x"
    for i in range(5):
        inits.append(("w%d" % i, rng.standard_normal((3, 3, 3, 3)).astype(np.float32)))
        nodes.append(helper.make_node("Conv", [x, "w%d" % i], ["c%d" % i], strides=[2, 2], pads=[1, 1, 1, 1]))
        x = "c%d" % i
    inits.append(("flat", np.array([-1, 3 * 7 * 7], np.int64)))
    inits.append(("fc", rng.standard_normal((3 * 7 * 7, 5)).astype(np.float32)))
    nodes += [helper.make_node("Reshape", [x, "flat"], ["r"]), helper.make_node("MatMul", ["r", "fc"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    report = verify(model, model)
    assert report.passed
    assert report.shape_sets == [{"x": [1, 3, 224, 224]}, {"x": [2, 3, 224, 224]}]


def test_a_fold_right_at_one_batch_size_only_fails():
    """'folded' adds ReduceMean over the batch minus x: zero at batch 1, not at the second shape's batch."""
    original = image_model(["N", 3, "H", "W"])
    wrong = onnx.ModelProto()
    wrong.CopyFrom(original)
    wrong.graph.node[0].output[0] = "conv"
    wrong.graph.node.extend([
        helper.make_node("ReduceMean", ["conv"], ["batch_mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["batch_mean", "conv"], ["zero_at_batch_1"]),
        helper.make_node("Add", ["conv", "zero_at_batch_1"], ["y"]),
    ])
    report = verify(original, wrong)
    assert not report.passed
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(run(wrong, {"x": x})[0], run(original, {"x": x})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("declared, given", [
    ([2**40, 3, 8, 8], None),
    (["N", 3, 8, 8], {"x": [2**40, 3, 8, 8]}),
    (["N", 3, "H", "W"], {"x": [1, 3, 2**20, 2**20]}),
])
def test_huge_dims_are_refused_before_any_allocation(declared, given):
    model = image_model(declared)
    with pytest.raises(ShapeError, match="would take [0-9,]+ bytes for verification, more than its limit of "
                                         + format(INPUT_BYTES_LIMIT, ",")) as caught:
        verify(model, model, shapes=given)
    assert "--no-verify" in caught.value.worded(CLI_WORDS) and "shapes=" in str(caught.value)


def test_a_huge_fixed_dim_leaves_no_affordable_candidate():
    model = image_model(["N", 3, 2**20, 2**20])
    with pytest.raises(ShapeError, match="byte limit"):
        verify(model, model)


def test_a_rank_0_bool_input_drives_an_if():
    then_graph = helper.make_graph([helper.make_node("Neg", ["x"], ["then_y"])], "then", [],
                                   [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["else_y"])], "else", [],
                                   [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, None)])
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
                       [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    feeds, used, _ = make_inputs(model, seed=0)
    assert isinstance(feeds["cond"], np.ndarray) and feeds["cond"].shape == () and feeds["cond"].dtype == np.bool_
    assert used["cond"] == []
    report = verify(model, model)
    assert report.passed and report.shape_sets[0]["cond"] == []


def test_the_ladder_is_bounded_and_in_order():
    model = image_model(["N", 3, "H", "W"])
    specs = input_specs(model, {})
    first = shapes.first_candidates(specs, model)
    assert len(first) <= shapes.FIRST_SHAPE_ATTEMPTS
    sizes = [c[Symbol("H", "size")] for c in first if c[Symbol("N", "batch")] == 1]
    assert sizes[:5] == [224, 64, 32, 256, 320]
    second = shapes.second_candidates(specs, model, first[0])
    assert len(second) <= shapes.SECOND_SHAPE_ATTEMPTS
    assert all(c != first[0] for c in second)


def test_the_ladder_stops_after_its_time_budget(monkeypatch):
    from foldnorm.fold.verification import runner as verification

    monkeypatch.setattr(verification, "LADDER_SECONDS", 0.0)  # every failed attempt exhausts the budget
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       [("shape", np.array([5, 3], np.int64))])
    with pytest.raises(ShapeError, match=r"at none of the 1 input shapes tried \(x=\[1,3\], \.\.\.\): Reshape node"):
        verify(model, model)
    monkeypatch.undo()
    assert verify(model, model).shape_sets == [{"x": [5, 3]}]  # 5 comes from the Reshape's own constant
