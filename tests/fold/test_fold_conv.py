"""Backward folds into Conv and ConvTranspose: any rank, grouped, depthwise, with and without bias."""
import pytest

from tests.fold.fold_models import ModelBuilder, conv_bn_model, count_ops, fold_and_compare, outcome

FLOAT32_TOLERANCE = 2e-6


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("group, channels_in, channels_out", [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)],
                         ids=["dense", "grouped", "depthwise", "depthwise-multiplier"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv_batch_norm_folds_into_the_conv(rank, group, channels_in, channels_out, bias):
    model = conv_bn_model(rank=rank, channels_in=channels_in, channels_out=channels_out, group=group, bias=bias)
    folded, report, error = fold_and_compare(model)
    assert count_ops(folded, "BatchNormalization") == 0
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert len(folded.graph.node[0].input) == 3  # a bias was created when there was none
    assert error < FLOAT32_TOLERANCE
    assert outcome(report, "bn").action == "folded" and outcome(report, "bn").into == "Conv"
    assert report.nodes_before == 2 and report.nodes_after == 1


def conv_transpose_bn_model(rank, group, channels_in, out_per_group, bias, strides, pads=0, seed=0):
    b = ModelBuilder(seed)
    spatial = [5, 4, 3][:rank]
    x = b.input("x", [2, channels_in] + spatial)
    inputs = [x, b.weight("w", [channels_in, out_per_group] + [3] * rank)]
    channels_out = out_per_group * group
    if bias:
        inputs.append(b.weight("w_bias", (channels_out,)))
    b.node("ConvTranspose", inputs, ["deconv"], name="deconv", group=group, strides=[strides] * rank,
           pads=[pads] * (2 * rank))
    b.batch_norm("deconv", "y", channels_out, name="bn")
    b.output("y", [2, channels_out] + [(s - 1) * strides + 3 - 2 * pads for s in spatial])
    return b.model()


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("group, channels_in, out_per_group", [(1, 4, 3), (2, 4, 3), (4, 4, 1), (4, 8, 2)],
                         ids=["dense", "grouped", "depthwise", "grouped-wide"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv_transpose_batch_norm_folds_per_group(rank, group, channels_in, out_per_group, bias):
    model = conv_transpose_bn_model(rank, group, channels_in, out_per_group, bias, strides=2, pads=1)
    folded, report, error = fold_and_compare(model)
    assert count_ops(folded, "BatchNormalization") == 0
    assert [n.op_type for n in folded.graph.node] == ["ConvTranspose"]
    assert error < FLOAT32_TOLERANCE
    assert outcome(report, "bn").into == "ConvTranspose"


def test_channel_count_mismatch_between_conv_and_batch_norm_is_never_folded():
    # a depthwise Conv whose weight says 4 outputs cannot absorb a 4-channel BN of the wrong axis: here a BN
    # over a Flatten of the Conv output (rank 2, 4*H*W channels) must stay
    b = ModelBuilder()
    x = b.input("x", [1, 4, 3, 3])
    b.node("Conv", [x, b.weight("w", [4, 1, 1, 1])], ["c"], group=4, name="conv")
    b.node("Flatten", ["c"], ["f"])
    b.batch_norm("f", "y", 36, name="bn")
    b.output("y", [1, 36])
    model = b.model()
    folded, report, error = fold_and_compare(model, rewrite_bn=True)
    assert count_ops(folded, "BatchNormalization") == 0
    assert outcome(report, "bn").action == "rewritten"
    assert "Flatten" in outcome(report, "bn").reason
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Flatten", "Mul", "Add"]
    assert error < FLOAT32_TOLERANCE
    mul = folded.graph.node[2]
    (scale,) = [t for t in folded.graph.initializer if t.name == mul.input[1]]
    assert list(scale.dims) == [36]
