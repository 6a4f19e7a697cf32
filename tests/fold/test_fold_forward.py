"""Forward folds: a BatchNormalization whose producer cannot absorb it folds into its only reader -- a Conv
without padding, a Gemm with transA=0, a 2-D MatMul -- and never into a padded Conv."""
import numpy as np
import pytest
from onnx import helper

from tests.fold.fold_models import ModelBuilder, count_ops, fold_and_compare, outcome

FLOAT32_TOLERANCE = 2e-6


def bn_then_conv(pads=None, auto_pad=None, group=1, bias=True, channels=4, out_channels=6, kernel=3, rank=2,
                 strides=1, seed=0):
    """x -> BN -> Conv -> y: the BN reads a graph input, so only a forward fold can remove it."""
    b = ModelBuilder(seed)
    spatial = [8, 7, 6][:rank]
    x = b.input("x", [2, channels] + spatial)
    b.batch_norm(x, "normalized", channels, name="bn")
    inputs = ["normalized", b.weight("w", [out_channels, channels // group] + [kernel] * rank)]
    if bias:
        inputs.append(b.weight("w_bias", [out_channels]))
    attributes = {"group": group, "strides": [strides] * rank}
    if pads is not None:
        attributes["pads"] = [pads] * (2 * rank)
    if auto_pad is not None:
        attributes["auto_pad"] = auto_pad
    b.node("Conv", inputs, ["y"], name="conv", **attributes)
    b.output("y", ["d%d" % axis for axis in range(rank + 2)])
    return b.model()


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("group, channels, out_channels", [(1, 4, 6), (2, 4, 6), (4, 4, 8)],
                         ids=["dense", "grouped", "depthwise"])
@pytest.mark.parametrize("padding", [{"pads": 0}, {"auto_pad": "VALID"}, {}], ids=["pads-0", "valid", "default"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_batch_norm_folds_forward_into_an_unpadded_conv(rank, group, channels, out_channels, padding, bias):
    model = bn_then_conv(group=group, channels=channels, out_channels=out_channels, rank=rank, bias=bias,
                         strides=2, **padding)
    folded, report, error = fold_and_compare(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert outcome(report, "bn").folded_into == "Conv (forward)"
    assert error < FLOAT32_TOLERANCE


@pytest.mark.parametrize("padding", [{"pads": 1}, {"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER"}],
                         ids=["pads-1", "same-upper", "same-lower"])
def test_padded_conv_never_absorbs_the_batch_norm_forward(padding):
    model = bn_then_conv(**padding)
    folded, report, error = fold_and_compare(model, rewrite_bn=True)
    assert count_ops(folded, "BatchNormalization") == 0
    assert [n.op_type for n in folded.graph.node] == ["Mul", "Add", "Conv"]
    bn = outcome(report, "bn")
    assert bn.action == "rewritten" and "pads its input" in bn.reason
    assert error < FLOAT32_TOLERANCE
    conv = folded.graph.node[2]
    assert conv.input[1] == "w", "the padded Conv's weight must be untouched"


def test_padded_conv_forward_trap_with_keep_bn_leaves_the_batch_norm():
    model = bn_then_conv(pads=1)
    folded, report, error = fold_and_compare(model, keep_bn=True)
    assert [n.op_type for n in folded.graph.node] == ["BatchNormalization", "Conv"]
    assert outcome(report, "bn").action == "left"
    assert error == 0.0


def test_forward_fold_needs_the_conv_to_be_the_only_reader():
    model = bn_then_conv(pads=0)
    model.graph.output.add().CopyFrom(model.graph.output[0])
    model.graph.output[1].name = "normalized"
    folded, report, error = fold_and_compare(model, rewrite_bn=True)
    assert count_ops(folded, "BatchNormalization") == 0
    assert outcome(report, "bn").action == "rewritten"
    assert "graph output" in outcome(report, "bn").reason
    assert error < FLOAT32_TOLERANCE


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha, beta, with_c", [(1.0, 1.0, True), (0.5, 3.0, True), (2.0, 1.0, False)])
def test_batch_norm_folds_forward_into_gemm(trans_b, alpha, beta, with_c):
    b = ModelBuilder()
    x = b.input("x", [5, 6])
    b.batch_norm(x, "normalized", 6, name="bn")
    inputs = ["normalized", b.weight("w", [4, 6] if trans_b else [6, 4])]
    if with_c:
        inputs.append(b.weight("c", [4]))
    b.node("Gemm", inputs, ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)
    b.output("y", [5, 4])
    folded, report, error = fold_and_compare(b.model())
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    assert outcome(report, "bn").folded_into == "Gemm (forward)"
    assert error < FLOAT32_TOLERANCE


def test_gemm_with_trans_a_does_not_absorb_forward():
    b = ModelBuilder()
    x = b.input("x", [6, 5])
    b.batch_norm(x, "normalized", 5, name="bn")  # transA: the BN's channels are Gemm's M rows
    b.node("Gemm", ["normalized", b.weight("w", [6, 4])], ["y"], name="gemm", transA=1)
    b.output("y", [5, 4])
    folded, report, error = fold_and_compare(b.model(), rewrite_bn=True)
    assert outcome(report, "bn").action == "rewritten" and "transA=1" in outcome(report, "bn").reason
    assert error < FLOAT32_TOLERANCE


@pytest.mark.parametrize("with_bias", [False, True])
def test_batch_norm_folds_forward_into_a_2d_matmul(with_bias):
    b = ModelBuilder()
    x = b.input("x", [5, 6])
    b.batch_norm(x, "normalized", 6, name="bn")
    b.node("MatMul", ["normalized", b.weight("w", [6, 4])], ["mm"], name="matmul")
    if with_bias:
        b.node("Add", ["mm", b.weight("bias", [4])], ["y"], name="bias_add")
    else:
        b.node("Identity", ["mm"], ["y"])
    b.output("y", [5, 4])
    folded, report, error = fold_and_compare(b.model())
    assert count_ops(folded, "BatchNormalization") == 0
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"] + ([] if with_bias else ["Identity"])
    assert outcome(report, "bn").folded_into == "MatMul (forward)"
    assert error < FLOAT32_TOLERANCE


def test_pre_activation_batch_norm_before_relu_is_rewritten_not_folded():
    b = ModelBuilder()
    x = b.input("x", [2, 4, 6, 6])
    b.batch_norm(x, "normalized", 4, name="bn")
    b.node("Relu", ["normalized"], ["r"])
    b.node("Conv", ["r", b.weight("w", [4, 4, 1, 1])], ["y"], name="conv")
    b.output("y", [2, 4, 6, 6])
    folded, report, error = fold_and_compare(b.model(), rewrite_bn=True)
    assert [n.op_type for n in folded.graph.node] == ["Mul", "Add", "Relu", "Conv"]
    assert error < FLOAT32_TOLERANCE


@pytest.mark.parametrize("kernel, strides, foldable", [(1, 1, True), (3, 1, False), (1, 2, False)])
def test_forward_into_conv_transpose_only_when_exact(kernel, strides, foldable):
    b = ModelBuilder()
    x = b.input("x", [2, 4, 5, 5])
    b.batch_norm(x, "normalized", 4, name="bn")
    b.node("ConvTranspose", ["normalized", b.weight("w", [4, 3, kernel, kernel])], ["y"], name="deconv",
           strides=[strides, strides])
    b.output("y", [2, 3, (5 - 1) * strides + kernel, (5 - 1) * strides + kernel])
    folded, report, error = fold_and_compare(b.model(), rewrite_bn=True)
    assert count_ops(folded, "BatchNormalization") == 0
    assert outcome(report, "bn").action == ("folded" if foldable else "rewritten")
    assert error < FLOAT32_TOLERANCE


@pytest.mark.parametrize("x_channels, foldable", [(4, True), (1, False)])
def test_per_channel_mul_before_an_unpadded_conv(x_channels, foldable):
    # with a 1-channel input the Mul broadcasts it to 4 channels: removing the Mul would change the Conv's input
    b = ModelBuilder()
    x = b.input("x", [2, x_channels, 5, 5])
    b.node("Mul", [x, b.weight("k", [1, 4, 1, 1])], ["scaled"], name="mul")
    b.node("Conv", ["scaled", b.weight("w", [3, 4, 3, 3])], ["y"], name="conv")
    b.output("y", [2, 3, 3, 3])
    folded, report, error = fold_and_compare(b.model())
    assert [n.op_type for n in folded.graph.node] == (["Conv"] if foldable else ["Mul", "Conv"])
    assert [o.folded_into for o in report.outcomes] == (["Conv (forward)"] if foldable else [])
    assert error < FLOAT32_TOLERANCE


@pytest.mark.parametrize("ir_version", [3, 8])
def test_conv_absorbs_a_batch_norm_on_each_side(ir_version):
    b = ModelBuilder()
    x = b.input("x", [2, 4, 6, 6])
    b.batch_norm(x, "normalized", 4, name="bn_before")
    b.node("Conv", ["normalized", b.weight("w", [5, 4, 3, 3])], ["c"], name="conv")
    b.batch_norm("c", "y", 5, name="bn_after")
    b.output("y", [2, 5, 4, 4])
    model = b.model(ir_version=ir_version)
    if ir_version < 4:
        for tensor in model.graph.initializer:
            model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    folded, report, error = fold_and_compare(model, {"x": np.random.default_rng(2).standard_normal((2, 4, 6, 6))
                                                     .astype(np.float32)})
    assert [(o.node, o.folded_into) for o in report.outcomes] == [("bn_before", "Conv (forward)"), ("bn_after", "Conv")]
    assert count_ops(folded, "BatchNormalization") == 0
    # the intermediate weights of the first fold are gone: one weight and one bias remain
    if ir_version < 4:
        assert [n.op_type for n in folded.graph.node] == ["Constant", "Constant", "Conv"]
    else:
        assert [n.op_type for n in folded.graph.node] == ["Conv"] and len(folded.graph.initializer) == 2
    assert error < FLOAT32_TOLERANCE
