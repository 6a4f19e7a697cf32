"""Folds through layout ops: a map whose channels reach a MatMul / Gemm / Conv through Transpose, Reshape,
Flatten, Squeeze or Unsqueeze folds when they land on the one axis the layer's weight indexes, backward
and forward; otherwise it stays (as Mul/Add) and the model is unchanged in value."""
import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.fold.fold_models import ModelBuilder, count_ops, fold_and_compare, outcome, random_feeds

TOLERANCE = 2e-5
B, T, K, N = 3, 5, 4, 6


def _ints(b, name, values):
    b.initializers.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


def _feeds(model, shapes):
    return random_feeds(model, shapes=shapes)


def test_token_batch_norm_between_transposes_folds_into_the_matmul_and_its_bias():
    # Linear over tokens, then BatchNorm1d over the features: MatMul + Add -> Transpose -> BN -> Transpose
    b = ModelBuilder(1)
    x = b.input("x", ["batch", "tokens", K])
    b.node("MatMul", [x, b.weight("w", [K, N])], ["mm"], name="matmul")
    b.node("Add", ["mm", b.weight("bias", [N])], ["lin"], name="bias_add")
    b.node("Transpose", ["lin"], ["t"], name="to_channels", perm=[0, 2, 1])
    b.batch_norm("t", "bn_out", N, name="bn")
    b.node("Transpose", ["bn_out"], ["y"], name="to_tokens", perm=[0, 2, 1])
    b.output("y", ["batch", "tokens", N])
    model = b.model()
    folded, report, error = fold_and_compare(model, _feeds(model, {"x": [B, T, K]}))
    bn = outcome(report, "bn")
    assert (bn.action, bn.into, bn.direction) == ("folded", "MatMul", "backward")
    assert "through Transpose 'to_channels'" in bn.reason
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Mul") == 0
    assert error < TOLERANCE


def test_token_batch_norm_before_a_transpose_folds_forward_into_the_matmul():
    b = ModelBuilder(2)
    x = b.input("x", ["batch", K, "tokens"])
    b.batch_norm(x, "bn_out", K, name="bn")
    b.node("Transpose", ["bn_out"], ["t"], name="to_tokens", perm=[0, 2, 1])
    b.node("MatMul", ["t", b.weight("w", [K, N])], ["y"], name="matmul")
    b.output("y", ["batch", "tokens", N])
    model = b.model()
    folded, report, error = fold_and_compare(model, _feeds(model, {"x": [B, K, T]}))
    bn = outcome(report, "bn")
    assert (bn.action, bn.into, bn.direction) == ("folded", "MatMul", "forward")
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Mul") == 0
    assert error < TOLERANCE


def test_batch_norm_of_a_1x1_conv_output_after_flatten_folds_back_into_the_conv():
    b = ModelBuilder(3)
    x = b.input("x", ["batch", 3, 4, 4])
    b.node("GlobalAveragePool", [x], ["pooled"])
    b.node("Conv", ["pooled", b.weight("w", [N, 3, 1, 1]), b.weight("cb", [N])], ["conv"], name="conv")
    b.node("Flatten", ["conv"], ["flat"], name="flatten")
    b.batch_norm("flat", "bn_out", N, name="bn")
    b.node("Relu", ["bn_out"], ["y"])
    b.output("y", ["batch", N])
    model = b.model()
    folded, report, error = fold_and_compare(model, _feeds(model, {"x": [B, 3, 4, 4]}))
    bn = outcome(report, "bn")
    assert (bn.action, bn.into, bn.direction) == ("folded", "Conv", "backward")
    assert "through Flatten 'flatten'" in bn.reason
    assert error < TOLERANCE


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_conv_batch_norm_flatten_gemm_folds_forward_repeated_over_each_channels_features(flatten):
    # the BN's input is a graph input, so only the forward fold is open: feature c*H*W + s of the Gemm's
    # input gets channel c's map
    b = ModelBuilder(4)
    x = b.input("x", ["batch", 3, 2, 2])
    b.batch_norm(x, "bn_out", 3, name="bn")
    if flatten == "Flatten":
        b.node("Flatten", ["bn_out"], ["flat"], name="flatten")
    else:
        b.node("Reshape", ["bn_out", _ints(b, "shape", [0, -1])], ["flat"], name="flatten")
    b.node("Gemm", ["flat", b.weight("w", [N, 12]), b.weight("c", [N])], ["y"], name="gemm", transB=1)
    b.output("y", ["batch", N])
    model = b.model()
    folded, report, error = fold_and_compare(model, _feeds(model, {"x": [B, 3, 2, 2]}))
    bn = outcome(report, "bn")
    assert (bn.action, bn.into, bn.direction) == ("folded", "Gemm", "forward")
    assert [n.op_type for n in folded.graph.node] == [flatten, "Gemm"]
    assert error < TOLERANCE


def test_channels_last_flatten_tiles_the_map_over_the_positions():
    b = ModelBuilder(5)
    x = b.input("x", ["batch", 3, 2, 2])
    b.batch_norm(x, "bn_out", 3, name="bn")
    b.node("Transpose", ["bn_out"], ["nhwc"], name="nhwc", perm=[0, 2, 3, 1])
    b.node("Reshape", ["nhwc", _ints(b, "shape", [-1, 12])], ["flat"], name="flatten")
    b.node("MatMul", ["flat", b.weight("w", [12, N])], ["y"], name="matmul")
    b.output("y", ["batch", N])
    model = b.model()
    folded, report, error = fold_and_compare(model, _feeds(model, {"x": [B, 3, 2, 2]}))
    assert outcome(report, "bn").into == "MatMul" and outcome(report, "bn").direction == "forward"
    assert error < TOLERANCE


def test_unsqueeze_to_a_1x1_conv_and_squeeze_back():
    b = ModelBuilder(6)
    x = b.input("x", ["batch", 4])
    b.batch_norm(x, "bn1_out", 4, name="bn_forward")
    b.node("Unsqueeze", ["bn1_out", _ints(b, "axes", [2, 3])], ["image"], name="unsqueeze")
    b.node("Conv", ["image", b.weight("w", [N, 4, 1, 1])], ["conv"], name="conv")
    b.node("Squeeze", ["conv", "axes"], ["vec"], name="squeeze")
    b.batch_norm("vec", "y", N, name="bn_backward")
    b.output("y", ["batch", N])
    model = b.model(opset=15)
    folded, report, error = fold_and_compare(model, _feeds(model, {"x": [B, 4]}))
    forward, backward = outcome(report, "bn_forward"), outcome(report, "bn_backward")
    assert (forward.into, forward.direction) == ("Conv", "forward")
    assert (backward.into, backward.direction) == ("Conv", "backward")
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Mul") == 0
    assert error < TOLERANCE


@pytest.mark.parametrize("batch", [2, "batch"])
def test_channels_merged_with_the_batch_do_not_fold_and_stay_correct(batch):
    # (N, C, H, W) -> (N*C, H*W): the BN's channels now run along the rows, which no weight indexes
    b = ModelBuilder(7)
    x = b.input("x", [batch, 3, 2, 2])
    b.batch_norm(x, "bn_out", 3, name="bn")
    b.node("Reshape", ["bn_out", _ints(b, "shape", [-1, 4])], ["rows"], name="rows")
    b.node("MatMul", ["rows", b.weight("w", [4, N])], ["y"], name="matmul")
    b.output("y", [None, N])
    model = b.model()
    folded, report, error = fold_and_compare(model, _feeds(model, {"x": [2, 3, 2, 2]}))
    bn = outcome(report, "bn")
    assert bn.action == "left"
    if batch == 2:  # row i is channel i % 3: a map along axis 0, where MatMul's weight has no say
        assert "its channels are on axis 0 of MatMul 'matmul''s 2-D input, whose features are on axis 1" in bn.reason
    else:  # the rows' count is unknown, so where the channels fall is too
        assert "do not land on a single axis after Reshape 'rows'" in bn.reason
    assert error < TOLERANCE


def test_a_transpose_to_the_wrong_axis_does_not_fold():
    # the BN's channels end up on axis 1 of a 3-D MatMul input, whose features are on axis 2
    b = ModelBuilder(8)
    x = b.input("x", [2, 4, 3, K])
    b.batch_norm(x, "bn_out", 4, name="bn")
    b.node("Transpose", ["bn_out"], ["t"], name="swap", perm=[0, 1, 2, 3])
    b.node("Reshape", ["t", _ints(b, "shape", [2, 4, 3 * K])], ["r"], name="merge")
    b.node("MatMul", ["r", b.weight("w", [3 * K, N])], ["y"], name="matmul")
    b.output("y", [2, 4, N])
    model = b.model()
    folded, report, error = fold_and_compare(model)
    bn = outcome(report, "bn")
    assert bn.action == "left"
    assert "axis 1 of MatMul 'matmul''s 3-D input, whose features are on axis 2" in bn.reason
    assert error < TOLERANCE


def test_a_layout_op_with_another_reader_stops_the_route():
    b = ModelBuilder(9)
    x = b.input("x", [2, 5, K])
    b.node("MatMul", [x, b.weight("w", [K, N])], ["mm"], name="matmul")
    b.node("Transpose", ["mm"], ["t"], name="to_channels", perm=[0, 2, 1])
    b.node("Relu", ["t"], ["side"])
    b.batch_norm("t", "y", N, name="bn")
    b.output("y", [2, N, 5])
    b.output("side", [2, N, 5])
    model = b.model()
    folded, report, error = fold_and_compare(model)
    assert outcome(report, "bn").action == "left"
    assert error < TOLERANCE


def test_gemm_with_trans_a_takes_a_map_transposed_onto_its_k_axis():
    # A = Transpose(BN(x)) is (3, K_rows); transA=1 reads it as (K_rows, 3): the BN's channels are the K axis
    b = ModelBuilder(10)
    x = b.input("x", [K, 3])
    b.batch_norm(x, "bn_out", 3, name="bn")
    b.node("Transpose", ["bn_out"], ["a"], name="swap", perm=[1, 0])
    b.node("Gemm", ["a", b.weight("w", [3, N])], ["y"], name="gemm", transA=1)
    b.output("y", [K, N])
    model = b.model()
    folded, report, error = fold_and_compare(model)
    bn = outcome(report, "bn")
    assert (bn.action, bn.into, bn.direction) == ("folded", "Gemm", "forward")
    assert error < TOLERANCE


def test_gemm_with_trans_a_refuses_a_map_on_its_m_axis():
    b = ModelBuilder(11)
    x = b.input("x", [3, 5])
    b.batch_norm(x, "bn_out", 5, name="bn")  # channels on axis 1: Gemm's M rows once transposed
    b.node("Gemm", ["bn_out", b.weight("w", [3, N])], ["y"], name="gemm", transA=1)
    b.output("y", [5, N])
    model = b.model()
    folded, report, error = fold_and_compare(model)
    bn = outcome(report, "bn")
    assert bn.action == "left" and "transA=1" in bn.reason
    assert error < TOLERANCE


def test_batch_norm_over_flattened_conv_features_folds_forward_into_the_gemm():
    # Conv -> Flatten -> BatchNorm1d(C*H*W) -> Gemm: one value per flattened feature, which the Conv's
    # per-channel weight cannot take (spatial 2x2), so it goes forward into the Gemm's columns
    b = ModelBuilder(12)
    x = b.input("x", ["batch", 3, 2, 2])
    b.node("Conv", [x, b.weight("w", [4, 3, 1, 1])], ["conv"], name="conv")
    b.node("Flatten", ["conv"], ["flat"], name="flatten")
    b.batch_norm("flat", "bn_out", 16, name="bn")
    b.node("Gemm", ["bn_out", b.weight("fc", [N, 16])], ["y"], name="gemm", transB=1)
    b.output("y", ["batch", N])
    model = b.model()
    folded, report, error = fold_and_compare(model, _feeds(model, {"x": [B, 3, 2, 2]}))
    bn = outcome(report, "bn")
    assert (bn.action, bn.into, bn.direction) == ("folded", "Gemm", "forward")
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Flatten", "Gemm"]
    assert error < TOLERANCE


# ---------------------------------------------------------------------- the channel map of a reshape


def _channel_ids(shape, axis, inner, channels):
    """Each element's channel: (index along `axis` // inner) % channels, broadcast over the others."""
    ids = (np.arange(shape[axis]) // inner) % channels
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(ids.reshape(view), shape)


def _places_by_search(ids, channels):
    """Every (axis, inner) whose pattern the reshaped channel ids follow exactly."""
    found = []
    for axis, size in enumerate(ids.shape):
        for inner in range(1, size + 1):
            if size % (inner * channels) == 0 and np.array_equal(ids, _channel_ids(ids.shape, axis, inner, channels)):
                found.append((axis, inner))
    return found


RESHAPES = [((2, 3, 4, 5), 1, (2, 60)), ((2, 3, 4, 5), 1, (6, 20)), ((2, 3, 4, 5), 1, (2, 3, 20)),
            ((2, 3, 4, 5), 2, (2, 12, 5)), ((2, 3, 4, 5), 2, (2, 3, 2, 10)), ((2, 6, 1, 1), 1, (2, 6)),
            ((2, 6, 1, 1), 1, (2, 2, 3)), ((4, 6), 1, (4, 3, 2)), ((4, 6), 1, (24,)), ((4, 6), 0, (2, 12)),
            ((2, 5, 6), 2, (2, 30)), ((2, 5, 6), 1, (10, 6)), ((3, 4, 4), 1, (3, 2, 8))]


@pytest.mark.parametrize("source, axis, target", RESHAPES)
def test_where_a_reshape_puts_the_channels_matches_a_search_over_every_axis(source, axis, target):
    from foldnorm.fold.core.layout import Place, _through_flat

    channels = source[axis]
    ids = _channel_ids(source, axis, 1, channels).reshape(target)
    found = _through_flat(source, Place(axis, 1), channels, target)
    expected = _places_by_search(ids, channels)
    if found is None:
        assert not [place for place in expected if target[place[0]] > 1], expected
    else:
        assert (found.axis, found.inner) in expected
