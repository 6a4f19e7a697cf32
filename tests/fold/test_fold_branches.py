"""Folds across branches (BN(Add), BN(Sum), BN(Concat)), and the producer traps: a producer with several
readers, a producer whose output is a graph output, a weight shared by two layers, a training-mode BN."""
import numpy as np
import pytest
import onnx
from onnx import helper, numpy_helper

from foldnorm.fold import fold_model

from tests.fold.fold_models import ModelBuilder, count_ops, fold_and_compare, outcome

FLOAT32_TOLERANCE = 2e-6


def two_branches(joint, kinds=("Conv", "Conv"), channels=(6, 6), axis=1):
    """x -> (layer a, layer b) -> joint -> BN -> y."""
    b = ModelBuilder()
    if kinds[0] == "Conv":
        x = b.input("x", [2, 3, 6, 6])
    else:
        x = b.input("x", [5, 3])
    branch_outputs = []
    for i, (kind, c) in enumerate(zip(kinds, channels)):
        out = "branch%d" % i
        if kind == "Conv":
            b.node("Conv", [x, b.weight("w%d" % i, [c, 3, 3, 3]), b.weight("b%d" % i, [c])], [out],
                   name="conv%d" % i, pads=[1, 1, 1, 1])
        elif kind == "Gemm":
            b.node("Gemm", [x, b.weight("w%d" % i, [3, c])], [out], name="gemm%d" % i, alpha=0.7)
        else:
            b.node("MatMul", [x, b.weight("w%d" % i, [3, c])], [out], name="matmul%d" % i)
        branch_outputs.append(out)
    attributes = {"axis": axis} if joint == "Concat" else {}
    b.node(joint, branch_outputs, ["joined"], name="joint", **attributes)
    total = sum(channels) if joint == "Concat" else channels[0]
    b.batch_norm("joined", "y", total, name="bn")
    b.output("y", [2, total, 6, 6] if kinds[0] == "Conv" else [5, total])
    return b.model()


@pytest.mark.parametrize("joint", ["Add", "Sum"])
@pytest.mark.parametrize("kinds", [("Conv", "Conv"), ("Gemm", "MatMul"), ("MatMul", "MatMul")])
def test_batch_norm_after_add_folds_into_both_branches(joint, kinds):
    model = two_branches(joint, kinds)
    folded, report, error = fold_and_compare(model)
    assert count_ops(folded, "BatchNormalization") == 0
    # the shift goes into the first branch: a MatMul without bias gets a bias Add for it
    assert count_ops(folded, joint) == (2 if joint == "Add" and kinds[0] == "MatMul" else 1)
    assert outcome(report, "bn").into == joint
    assert error < FLOAT32_TOLERANCE
    assert folded.graph.node[-1].output[0] == "y"


@pytest.mark.parametrize("kinds, channels", [(("Conv", "Conv"), (4, 6)), (("Gemm", "MatMul"), (2, 5))])
def test_batch_norm_after_channel_concat_folds_each_slice(kinds, channels):
    model = two_branches("Concat", kinds, channels)
    folded, report, error = fold_and_compare(model)
    assert count_ops(folded, "BatchNormalization") == 0
    assert outcome(report, "bn").into == "Concat"
    assert error < FLOAT32_TOLERANCE


def test_concat_along_another_axis_is_not_folded_across():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4, 4])
    for i in range(2):
        b.node("Conv", [x, b.weight("w%d" % i, [6, 3, 1, 1])], ["c%d" % i], name="conv%d" % i)
    b.node("Concat", ["c0", "c1"], ["joined"], axis=2, name="joint")
    b.batch_norm("joined", "y", 6, name="bn")
    b.output("y", [2, 6, 8, 4])
    folded, report, error = fold_and_compare(b.model())
    bn = outcome(report, "bn")
    assert bn.action == "left" and "axis 2" in bn.reason
    assert error < FLOAT32_TOLERANCE


def test_add_branch_with_another_reader_blocks_the_fold():
    model = two_branches("Add")
    model.graph.output.add().CopyFrom(helper.make_tensor_value_info("branch0", 1, [2, 6, 6, 6]))
    folded, report, error = fold_and_compare(model)
    assert outcome(report, "bn").action == "left"
    assert error < FLOAT32_TOLERANCE


def test_producer_with_several_readers_is_not_folded():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    b.node("Conv", [x, b.weight("w", [4, 3, 3, 3])], ["c"], name="conv")
    b.batch_norm("c", "y", 4, name="bn")
    b.node("Relu", ["c"], ["side"])
    b.output("y", [2, 4, 3, 3])
    b.output("side", [2, 4, 3, 3])
    folded, report, error = fold_and_compare(b.model())
    bn = outcome(report, "bn")
    assert bn.action == "left" and "2 readers" in bn.reason
    assert folded.graph.node[0].input[1] == "w"
    assert error < FLOAT32_TOLERANCE


def test_producer_whose_output_is_a_graph_output_is_not_folded():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    b.node("Conv", [x, b.weight("w", [4, 3, 3, 3])], ["c"], name="conv")
    b.batch_norm("c", "y", 4, name="bn")
    b.output("c", [2, 4, 3, 3])
    b.output("y", [2, 4, 3, 3])
    folded, report, error = fold_and_compare(b.model())
    assert outcome(report, "bn").action == "left"
    assert "graph output" in outcome(report, "bn").reason
    assert [o.name for o in folded.graph.output] == ["c", "y"]
    assert error < FLOAT32_TOLERANCE


def test_shared_weight_is_never_modified_in_place():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    weight = b.weight("shared_w", [4, 3, 3, 3])
    b.node("Conv", [x, weight], ["c0"], name="conv0")
    b.node("Conv", [x, weight], ["y1"], name="conv1")
    b.batch_norm("c0", "y0", 4, name="bn")
    b.output("y0", [2, 4, 3, 3])
    b.output("y1", [2, 4, 3, 3])
    model = b.model()
    original_weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
    folded, report, error = fold_and_compare(model)
    assert outcome(report, "bn").action == "folded"
    conv0, conv1 = folded.graph.node
    assert conv1.input[1] == "shared_w" and conv0.input[1] != "shared_w"
    (kept,) = [t for t in folded.graph.initializer if t.name == "shared_w"]
    np.testing.assert_array_equal(numpy_helper.to_array(kept), original_weight)
    assert error < FLOAT32_TOLERANCE


@pytest.mark.parametrize("opset", [14, 15, 17])
def test_training_mode_batch_norm_is_left_exactly(opset):
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    b.node("Conv", [x, b.weight("w", [4, 3, 3, 3])], ["c"], name="conv")
    b.node("BatchNormalization", ["c"] + b.batch_norm_params("bn", 4), ["y", "running_mean", "running_var"],
           name="bn", training_mode=1)
    b.output("y", [2, 4, 3, 3])
    model = b.model(opset=opset)
    folded, report, _ = fold_and_compare(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization"]
    assert folded.graph.node[1] == model.graph.node[1]
    bn = outcome(report, "bn")
    assert bn.action == "left" and "training_mode=1" in bn.reason


def test_opset9_batch_norm_with_running_statistics_outputs_is_left():
    # before opset 14, the extra outputs are what makes a BatchNormalization a training-mode one
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    b.node("BatchNormalization", [x] + b.batch_norm_params("bn", 3),
           ["y", "mean_out", "var_out", "saved_mean", "saved_var"], name="bn")
    b.output("y", [2, 3, 5, 5])
    model = b.model(opset=9)
    folded, report = fold_model(model, verify=False)
    onnx.checker.check_model(folded, full_check=True)
    assert folded.graph.node[0] == model.graph.node[0]
    bn = outcome(report, "bn")
    assert bn.action == "left" and "training mode" in bn.reason


def test_batch_norm_whose_running_mean_output_is_read_is_left():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    b.node("BatchNormalization", [x] + b.batch_norm_params("bn", 3), ["y", "mean_out", "var_out"], name="bn",
           training_mode=0)
    b.output("y", [2, 3, 5, 5])
    b.output("mean_out", [3])
    model = b.model(opset=15)
    folded, report = fold_model(model, verify=False)
    assert folded.graph.node[0] == model.graph.node[0]
    bn = outcome(report, "bn")
    assert bn.action == "left" and "'mean_out' is used" in bn.reason
