"""Every float dtype (float16, bfloat16, float32, float64, BN-15's mixed types), every supported opset of
BatchNormalization (7, 9, 14, 15, the newest onnx knows), and parameters that are not initializers:
Constant nodes and constant sub-graphs (ConstantOfShape/Cast/Reshape/...)."""
import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldnorm.fold.errors import FoldError
from foldnorm.fold import fold_model
from tests.fold.fold_models import (ModelBuilder, bfloat16_as_float32, conv_bn_model, count_ops, fold_and_compare,
                         max_relative_error, outcome, random_feeds, run_reference)

NEWEST = onnx.defs.onnx_opset_version()


def gemm_bn_relu_bn(dtype):
    """x -> Gemm -> BN -> Relu -> BN -> y: one backward fold and one Mul/Add rewrite."""
    b = ModelBuilder(dtype=dtype)
    x = b.input("x", [4, 5])
    b.node("Gemm", [x, b.weight("w", [5, 6]), b.weight("c", [6])], ["g"], name="gemm", beta=0.5)
    b.batch_norm("g", "n", 6, name="bn1")
    b.node("Relu", ["n"], ["r"])
    b.batch_norm("r", "y", 6, name="bn2")
    b.output("y", [4, 6])
    return b.model()


@pytest.mark.parametrize("dtype, tolerance", [(np.float16, 4e-3), (np.float32, 2e-6), (np.float64, 1e-12)])
def test_gemm_and_rewrite_in_each_float_dtype(dtype, tolerance):
    model = gemm_bn_relu_bn(dtype)
    folded, report, error = fold_and_compare(model, rewrite_bn=True)
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Relu", "Mul", "Add"]
    assert error < tolerance
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    assert {t.data_type for t in folded.graph.initializer} == {elem}


@pytest.mark.parametrize("rank", [1, 2])
def test_float16_conv_batch_norm(rank):
    model = conv_bn_model(rank=rank, dtype=np.float16, group=2)
    folded, report, error = fold_and_compare(model)
    assert count_ops(folded, "BatchNormalization") == 0
    assert error < 4e-3
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}


def bfloat16_model(opset=15):
    b = ModelBuilder()
    b.elem = TensorProto.BFLOAT16
    x = b.input("x", [4, 5])
    for name, shape in (("w", [5, 6]), ("c", [6])):
        b.initializers.append(numpy_helper.from_array(
            b.rng.standard_normal(shape).astype(np.float32).astype(ml_dtypes.bfloat16), name))
    b.node("Gemm", [x, "w", "c"], ["g"], name="gemm", alpha=0.5)
    params = []
    for name in ("scale", "bias", "mean", "var"):
        values = b.rng.standard_normal(6)
        values = np.abs(values) + 0.5 if name == "var" else values
        b.initializers.append(numpy_helper.from_array(values.astype(np.float32).astype(ml_dtypes.bfloat16), name))
        params.append(name)
    b.node("BatchNormalization", ["g"] + params, ["n"], name="bn1")
    b.node("Relu", ["n"], ["r"])
    b.node("BatchNormalization", ["r"] + params, ["y"], name="bn2")
    b.output("y", [4, 6])
    return b.model(opset=opset)


def test_bfloat16_folds_and_rounds_the_new_weights_to_bfloat16():
    # onnxruntime runs no bfloat16 Gemm/BatchNormalization on CPU: compare the float32 image of both models
    model = bfloat16_model()
    folded, report = fold_model(model, verify=False, rewrite_bn=True)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Relu", "Mul", "Add"]
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.BFLOAT16}
    original32, folded32 = bfloat16_as_float32(model), bfloat16_as_float32(folded)
    error = max_relative_error(original32, folded32, random_feeds(original32))
    assert 0.0 < error < 2e-2  # the folded weights are rounded to bfloat16 (8 significant bits)


def test_batch_norm_15_mixed_dtypes_fold_into_a_float16_conv():
    b = ModelBuilder(dtype=np.float16)
    x = b.input("x", [2, 3, 6, 6])
    b.node("Conv", [x, b.weight("w", [4, 3, 3, 3])], ["c"], name="conv")
    b.node("BatchNormalization", ["c"] + b.batch_norm_params("bn", 4, mean_dtype=np.float32),
           ["y"], name="bn")
    b.output("y", [2, 4, 4, 4])
    model = b.model(opset=15)
    folded, report, error = fold_and_compare(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}
    assert error < 4e-3


def test_batch_norm_15_mixed_dtypes_rewritten_in_the_input_dtype():
    b = ModelBuilder(dtype=np.float16)
    x = b.input("x", [2, 3, 6, 6])
    b.node("BatchNormalization", [x] + b.batch_norm_params("bn", 3, dtype=np.float32), ["n"], name="bn")
    b.node("Relu", ["n"], ["y"])
    b.output("y", [2, 3, 6, 6])
    folded, report, error = fold_and_compare(b.model(opset=15), rewrite_bn=True)
    assert [n.op_type for n in folded.graph.node] == ["Mul", "Add", "Relu"]
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}
    assert error < 4e-3


@pytest.mark.parametrize("opset", [7, 9, 14, 15, NEWEST])
def test_each_batch_norm_opset_folds(opset):
    model = conv_bn_model(opset=opset)
    if opset == NEWEST:
        model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
        folded, report = fold_model(model, verify=False)
        onnx.checker.check_model(folded, full_check=True)
        feeds = random_feeds(model)
        expected, actual = run_reference(model, feeds)["y"], run_reference(folded, feeds)["y"]
        error = float(np.abs(actual - expected).max() / np.abs(expected).max())
    else:
        folded, report, error = fold_and_compare(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.opset_import[0].version == opset
    assert error < 2e-6


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_each_batch_norm_opset_rewrites(opset):
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4, 4])
    b.batch_norm(x, "y", 3, name="bn")
    b.output("y", [2, 3, 4, 4])
    folded, report, error = fold_and_compare(b.model(opset=opset), rewrite_bn=True)
    assert [n.op_type for n in folded.graph.node] == ["Mul", "Add"]
    assert error < 2e-6


def test_opset_7_spatial_0_with_per_element_parameters_is_left():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 4, 4])
    b.node("Conv", [x, b.weight("w", [3, 3, 1, 1])], ["c"], name="conv")
    params = [b.weight("bn_" + p, (3, 4, 4), positive=(p == "var")) for p in ("scale", "bias", "mean", "var")]
    b.node("BatchNormalization", ["c"] + params, ["y"], name="bn", spatial=0)
    b.output("y", [2, 3, 4, 4])
    model = b.model(opset=7)
    folded, report = fold_model(model, verify=False)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization"]
    bn = outcome(report, "bn")
    assert bn.action == "left" and "spatial=0" in bn.reason


def test_opset_7_spatial_0_with_per_channel_parameters_folds():
    model = conv_bn_model(opset=7, bn_attributes={"spatial": 0})
    folded, report = fold_model(model, verify=False)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    reference = conv_bn_model(opset=7)  # spatial=0 with (C,) parameters is the spatial map
    assert max_relative_error(reference, folded, random_feeds(reference)) < 2e-6


def test_opset_older_than_7_is_refused():
    model = conv_bn_model(opset=7)
    model.opset_import[0].version = 6
    with pytest.raises(FoldError, match="opset 6"):
        fold_model(model, verify=False)


def test_opset_newer_than_onnx_knows_is_refused():
    model = conv_bn_model(opset=15)
    model.opset_import[0].version = NEWEST + 1
    with pytest.raises(FoldError, match="newer"):
        fold_model(model, verify=False)


def test_parameters_given_as_constant_nodes():
    model = conv_bn_model()
    graph = model.graph
    param_bytes = sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)
    constants = []
    for tensor in list(graph.initializer):
        if tensor.name == "bn_scale":
            constants.append(helper.make_node("Constant", [], [tensor.name],
                                              value_floats=list(numpy_helper.to_array(tensor))))
        else:
            constants.append(helper.make_node("Constant", [], [tensor.name], value=tensor))
    del graph.initializer[:]
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    folded, report, error = fold_and_compare(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert error < 2e-6
    assert report.nodes_before == 2 + 6 and report.nodes_after == 1
    assert report.param_bytes_before == param_bytes


def test_parameters_from_constant_of_shape_cast_reshape_subgraphs():
    # the light_* models' way: weights computed by small constant sub-graphs
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    b.initializers.append(numpy_helper.from_array(np.array([4, 27], dtype=np.int64), "w_flat_shape"))
    b.initializers.append(numpy_helper.from_array(np.array([4, 3, 3, 3], dtype=np.int64), "w_shape"))
    b.node("ConstantOfShape", ["w_flat_shape"], ["w_flat"], value=numpy_helper.from_array(np.array([0.25], np.float64)))
    b.node("Cast", ["w_flat"], ["w_flat32"], to=TensorProto.FLOAT)
    b.node("Reshape", ["w_flat32", "w_shape"], ["w"])
    b.node("Conv", [x, "w"], ["c"], name="conv")
    params = []
    for i, name in enumerate(("scale", "bias", "mean", "var")):
        b.node("Constant", [], [name + "_row"], value=numpy_helper.from_array(
            np.array([[0.5 + i, 1.0, 2.0 + i, 3.0]], dtype=np.float32)))
        b.node("Squeeze", [name + "_row", "axes"], [name])
        params.append(name)
    b.initializers.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "axes"))
    b.node("BatchNormalization", ["c"] + params, ["y"], name="bn")
    b.output("y", [2, 4, 3, 3])
    model = b.model()
    folded, report, error = fold_and_compare(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert [t.name for t in folded.graph.initializer if t.name in ("w_shape", "w_flat_shape", "axes")] == []
    assert error < 2e-6


@pytest.mark.parametrize("keep_bn", [False, True])
def test_keep_bn_keeps_what_cannot_fold_as_batch_norm(keep_bn):
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    b.batch_norm(x, "n", 3, name="pre_bn")
    b.node("Relu", ["n"], ["r"])
    b.node("Conv", ["r", b.weight("w", [4, 3, 3, 3])], ["c"], name="conv")
    b.batch_norm("c", "y", 4, name="post_bn")
    b.output("y", [2, 4, 3, 3])
    folded, report, error = fold_and_compare(b.model(), keep_bn=keep_bn)
    expected = ["BatchNormalization", "Relu", "Conv"] if keep_bn else ["Mul", "Add", "Relu", "Conv"]
    assert [n.op_type for n in folded.graph.node] == expected
    assert outcome(report, "pre_bn").action == ("left" if keep_bn else "rewritten")
    assert outcome(report, "post_bn").action == "folded"
    assert error < 2e-6


def test_ir_version_3_model_drops_the_declarations_it_folded_and_gets_constant_nodes():
    # IR < 4: every initializer is also a graph input, and they are constants (onnxruntime's reading too);
    # the folded ones go, declaration included (tests/fold/test_old_ir.py has the rest)
    model = conv_bn_model(bias=False)
    model.ir_version = 3
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    folded, report, error = fold_and_compare(model, random_feeds(model))
    assert [i.name for i in folded.graph.input] == ["x"]
    assert folded.ir_version == 3 and len(folded.graph.initializer) == 0
    assert [n.op_type for n in folded.graph.node] == ["Constant", "Constant", "Conv"]
    assert count_ops(folded, "BatchNormalization") == 0
    assert error < 2e-6
