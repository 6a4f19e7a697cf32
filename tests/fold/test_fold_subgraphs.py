"""Subgraphs of If/Loop are folded by the same pass: inner weights, weights captured from the outer graph
(never modified: the outer graph may read them too), nested subgraphs."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.fold.fold_models import IR_VERSION, count_ops, fold_and_compare, outcome

FLOAT32_TOLERANCE = 2e-6
C = 3


def array(rng, shape, positive=False):
    values = rng.standard_normal(shape)
    return (np.abs(values) + 0.5 if positive else values).astype(np.float32)


def conv_bn_branch(name, rng, weight_name, inner_weight, nested=None):
    """A branch graph: Conv(x, weight) -> BN -> out (weight inside the branch or captured from outside)."""
    initializers = [numpy_helper.from_array(array(rng, (C,), positive=(p == "var")), "%s_%s" % (name, p))
                    for p in ("scale", "bias", "mean", "var")]
    if inner_weight:
        initializers.append(numpy_helper.from_array(array(rng, (C, C, 3, 3)), weight_name))
    nodes = [
        helper.make_node("Conv", ["x", weight_name], [name + "_conv"], pads=[1, 1, 1, 1], name=name + "_conv"),
        helper.make_node("BatchNormalization", [name + "_conv"] + ["%s_%s" % (name, p) for p in
                                                                    ("scale", "bias", "mean", "var")],
                         [name + "_bn_out" if nested else name + "_out"], name=name + "_bn"),
    ]
    if nested is not None:
        nodes.append(nested)
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(name + "_out", TensorProto.FLOAT,
                                                                              [1, C, 5, 5])],
                             initializers)


def if_model(inner_weight, nested=False, seed=0):
    rng = np.random.default_rng(seed)
    inner_if = None
    if nested:
        deep_then = conv_bn_branch("deep_then", rng, "outer_w", inner_weight=False)
        deep_else = helper.make_graph([helper.make_node("Relu", ["x"], ["deep_else_out"])], "deep_else", [],
                                      [helper.make_tensor_value_info("deep_else_out", TensorProto.FLOAT, [1, C, 5, 5])])
        inner_if = helper.make_node("If", ["cond"], ["then_out"], then_branch=deep_then, else_branch=deep_else,
                                    name="inner_if")
    then_branch = conv_bn_branch("then", rng, "then_w" if inner_weight else "outer_w", inner_weight,
                                 nested=inner_if)
    if nested:
        then_branch.node[1].output[0] = "then_bn_out"
        then_branch.node.append(helper.make_node("Relu", ["then_bn_out"], ["then_unused"]))
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["else_out"])], "else", [],
                                    [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [1, C, 5, 5])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch, name="if")]
    outer = [numpy_helper.from_array(array(rng, (C, C, 3, 3)), "outer_w")]
    # the outer graph reads the captured weight too: it must stay as it is
    nodes.append(helper.make_node("Conv", ["x", "outer_w"], ["z"], pads=[1, 1, 1, 1], name="outer_conv"))
    graph = helper.make_graph(
        nodes, "main",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 5, 5]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, C, 5, 5])],
        outer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = IR_VERSION
    return model


@pytest.mark.parametrize("inner_weight", [True, False], ids=["weight-in-branch", "weight-captured"])
@pytest.mark.parametrize("cond", [True, False])
def test_conv_batch_norm_inside_an_if_branch_folds(inner_weight, cond):
    model = if_model(inner_weight)
    feeds = {"cond": np.array(cond), "x": np.random.default_rng(3).standard_normal((1, C, 5, 5)).astype(np.float32)}
    folded, report, error = fold_and_compare(model, feeds)
    assert count_ops(folded, "BatchNormalization") == 0
    then_bn = outcome(report, "then_bn")
    assert then_bn.action == "folded" and then_bn.graph == "main/if.then_branch"
    assert error < FLOAT32_TOLERANCE
    (outer_w,) = [t for t in folded.graph.initializer if t.name == "outer_w"]
    np.testing.assert_array_equal(numpy_helper.to_array(outer_w), numpy_helper.to_array(model.graph.initializer[0]))
    (then_graph,) = [a.g for a in folded.graph.node[0].attribute if a.name == "then_branch"]
    assert [n.op_type for n in then_graph.node] == ["Conv"]
    assert {t.name for t in then_graph.initializer}.isdisjoint({"then_w", "then_scale", "then_var"})


@pytest.mark.parametrize("cond", [True, False])
def test_nested_if_branches_are_folded_recursively(cond):
    model = if_model(inner_weight=True, nested=True)
    feeds = {"cond": np.array(cond), "x": np.random.default_rng(4).standard_normal((1, C, 5, 5)).astype(np.float32)}
    folded, report, error = fold_and_compare(model, feeds)
    assert count_ops(folded, "BatchNormalization") == 0
    deep = outcome(report, "deep_then_bn")
    assert deep.action == "folded" and deep.graph == "main/if.then_branch/inner_if.then_branch"
    assert error < FLOAT32_TOLERANCE


def test_loop_body_is_folded():
    rng = np.random.default_rng(5)
    params = [numpy_helper.from_array(array(rng, (C,), positive=(p == "var")), "body_" + p)
              for p in ("scale", "bias", "mean", "var")]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Conv", ["state_in", "loop_w"], ["body_conv"], pads=[1, 1, 1, 1], name="body_conv"),
         helper.make_node("BatchNormalization", ["body_conv"] + ["body_" + p for p in ("scale", "bias", "mean", "var")],
                          ["body_bn"], name="body_bn"),
         helper.make_node("Tanh", ["body_bn"], ["state_out"])],
        "body",
        [helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [1, C, 5, 5])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, C, 5, 5])],
        params)
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body, name="loop")], "main",
        [helper.make_tensor_value_info("trips", TensorProto.INT64, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 5, 5])],
        [numpy_helper.from_array(array(rng, (C, C, 3, 3)) * 0.3, "loop_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = IR_VERSION
    feeds = {"trips": np.array(3, dtype=np.int64), "x": rng.standard_normal((1, C, 5, 5)).astype(np.float32)}
    folded, report, error = fold_and_compare(model, feeds)
    assert count_ops(folded, "BatchNormalization") == 0
    assert outcome(report, "body_bn").graph == "main/loop.body"
    assert error < 1e-5
    assert [t.name for t in folded.graph.initializer] == [], "the captured weight is read by nobody any more"


def test_batch_norm_inside_a_local_function_is_inlined_and_folded():
    """A model-local function (as torch's export_modules_as_functions writes) holding Conv -> BN: the pass
    inlines the functions and folds the BN into the Conv, and says so in the report."""
    rng = np.random.default_rng(5)
    params = ["w", "scale", "bias", "mean", "var"]
    block = helper.make_function(
        "local", "ConvBn", ["x"] + params, ["y"],
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"])],
        [helper.make_opsetid("", 17)])
    initializers = [numpy_helper.from_array(array(rng, (C, C, 3, 3)), "w")]
    initializers += [numpy_helper.from_array(array(rng, (C,), positive=(p == "var")), p) for p in params[1:]]
    graph = helper.make_graph(
        [helper.make_node("ConvBn", ["x"] + params, ["y"], domain="local", name="block")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 5, 5])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[block], ir_version=IR_VERSION)
    folded, report, error = fold_and_compare(model)
    assert error < FLOAT32_TOLERANCE
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Conv") == 1
    assert not any(node.op_type == "BatchNormalization" for f in folded.functions for node in f.node)
    assert report.counts()["normalizations"] == 1 and report.counts()["left"] == 0
    assert any("ConvBn" in note for note in report.notes)
