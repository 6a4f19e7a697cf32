"""Per-channel Mul/Add/Sub/Div chains (Caffe-style Scale layers) after Conv/ConvTranspose/Gemm fold into the
layer; a constant that does not broadcast along the channels only -- the (C,)-shaped Mul on NCHW -- never."""
import pytest
from onnx import numpy_helper

from foldnorm.fold import fold_model

from tests.fold.fold_models import ModelBuilder, fold_and_compare, outcome

FLOAT32_TOLERANCE = 2e-6
C = 4


def conv_then(ops, layer="Conv", seed=0):
    """x -> layer -> ops[0] -> ops[1] ... -> y; each op is (op_type, constant shape, constant first?).
    Returns (model, the layer's output channels)."""
    b = ModelBuilder(seed)
    x = b.input("x", [2, 3, 5, 5])
    if layer == "Conv":
        b.node("Conv", [x, b.weight("w", [C, 3, 3, 3])], ["v0"], name="layer")
    else:
        b.node("ConvTranspose", [x, b.weight("w", [3, C // 2, 3, 3])], ["v0"], name="layer", group=1)
    channels = C if layer == "Conv" else C // 2
    for i, (op_type, shape, constant_first) in enumerate(ops):
        constant = b.weight("k%d" % i, shape, positive=op_type == "Div")
        inputs = [constant, "v%d" % i] if constant_first else ["v%d" % i, constant]
        b.node(op_type, inputs, ["v%d" % (i + 1)], name="op%d" % i)
    b.nodes[-1].output[0] = "y"
    spatial = 3 if layer == "Conv" else 7
    b.output("y", [2, channels, spatial, spatial])
    return b.model(), channels


@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("ops", [
    [("Mul", "C11", False), ("Add", "C11", False)],
    [("Mul", "1C11", True), ("Add", "1C11", True)],
    [("Sub", "C11", False)],
    [("Sub", "C11", True)],
    [("Div", "C11", False)],
    [("Mul", "", False), ("Add", "1", False), ("Div", "111", False)],
    [("Mul", "C11", False), ("Sub", "1C11", True), ("Div", "C11", False), ("Add", "C11", True)],
], ids=["scale-layer", "constant-first", "sub", "reverse-sub", "div", "scalars", "long-chain"])
def test_per_channel_chain_folds_into_the_layer(layer, ops):
    channels = C if layer == "Conv" else C // 2
    shapes = {"C11": (channels, 1, 1), "1C11": (1, channels, 1, 1), "": (), "1": (1,), "111": (1, 1, 1)}
    model, _ = conv_then([(op, shapes[shape], first) for op, shape, first in ops], layer)
    folded, report, error = fold_and_compare(model)
    assert [n.op_type for n in folded.graph.node] == [layer]
    assert all(o.action == "folded" and o.into == layer for o in report.outcomes)
    assert len(report.outcomes) == len(ops)
    assert error < FLOAT32_TOLERANCE


def test_channel_shaped_mul_on_nchw_broadcasts_over_width_and_is_not_folded():
    # a (C,) constant lines up with the LAST axis (W), so with W == C it runs, but it is not per channel
    b = ModelBuilder()
    x = b.input("x", [2, 3, 6, 6])
    b.node("Conv", [x, b.weight("w", [C, 3, 3, 3])], ["c"], name="conv")
    b.node("Mul", ["c", b.weight("k", (C,))], ["y"], name="mul")
    b.output("y", [2, C, 4, 4])
    folded, report, error = fold_and_compare(b.model())
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Mul"]
    assert folded.graph.node[0].input[1] == "w"
    assert report.outcomes == []
    assert error == 0.0


def test_reverse_division_is_not_affine():
    model, _ = conv_then([("Div", (C, 1, 1), True)])
    folded, report, error = fold_and_compare(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Div"]
    assert error == 0.0


def test_division_by_zero_channel_is_not_folded():
    model, _ = conv_then([("Div", (C, 1, 1), False)])
    constant = model.graph.initializer[-1]
    values = numpy_helper.to_array(constant).copy()
    values[1] = 0.0
    constant.CopyFrom(numpy_helper.from_array(values, constant.name))
    folded, report = fold_model(model, verify=False)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Div"]
    assert report.outcomes == []


def test_batch_norm_followed_by_scale_layer_is_one_mul_and_one_add():
    # pre-activation BN + Caffe Scale (densenet style): rewritten together as a single Mul and Add
    b = ModelBuilder()
    x = b.input("x", [2, C, 5, 5])
    b.batch_norm(x, "n", C, name="bn")
    b.node("Mul", ["n", b.weight("gamma", (C, 1, 1))], ["scaled"], name="scale_mul")
    b.node("Add", ["scaled", b.weight("beta", (C, 1, 1))], ["shifted"], name="scale_add")
    b.node("Relu", ["shifted"], ["y"])
    b.output("y", [2, C, 5, 5])
    folded, report, error = fold_and_compare(b.model())
    assert [n.op_type for n in folded.graph.node] == ["Mul", "Add", "Relu"]
    assert outcome(report, "bn").action == "rewritten"
    assert outcome(report, "scale_mul").into == "Mul/Add"
    assert error < FLOAT32_TOLERANCE
    mul_constant = [t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1]][0]
    assert list(mul_constant.dims) == [C, 1, 1]


def test_conv_batch_norm_then_scale_layer_all_fold_into_the_conv():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    b.node("Conv", [x, b.weight("w", [C, 3, 1, 1])], ["c"], name="conv")
    b.batch_norm("c", "n", C, name="bn")
    b.node("Mul", ["n", b.weight("gamma", (1, C, 1, 1))], ["scaled"], name="scale_mul")
    b.node("Add", ["scaled", b.weight("beta", (C, 1, 1))], ["y"], name="scale_add")
    b.output("y", [2, C, 5, 5])
    folded, report, error = fold_and_compare(b.model())
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert [o.into for o in report.outcomes] == ["Conv", "Conv", "Conv"]
    assert error < FLOAT32_TOLERANCE
    assert len(folded.graph.initializer) == 2
