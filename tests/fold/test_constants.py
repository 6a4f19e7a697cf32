"""Layer and BatchNormalization parameters computed in the graph from constants are evaluated and folded;
a value that would be larger than the pass's limit is refused with a reason, before anything is
allocated."""
import tracemalloc

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldnorm.fold.core.constants import MAX_CONSTANT_BYTES, ConstantTooLarge, Constant, evaluate_node
from tests.fold.fold_models import ModelBuilder, count_ops, fold_and_compare, outcome, run_ort

TOLERANCE = 1e-5
C = 6


def _const(b, name, array):
    b.initializers.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def _constant_node(b, name, array):
    b.node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name + "_value"))
    return name


# Each builder writes a (C,) float32 parameter as a small constant sub-graph and returns its name and value.

def expand_of_scalar(b, name, rng):
    value = np.float32(rng.uniform(0.5, 1.5))
    shape = _constant_node(b, name + "_shape", np.array([C], np.int64))
    b.node("Expand", [_const(b, name + "_one", np.array([value], np.float32)), shape], [name])
    return name, np.full(C, value, np.float32)


def cast_constant_of_shape(b, name, rng):
    # torch's dynamo exporter: a zero bias as Cast(ConstantOfShape(shape)) of another type
    shape = _const(b, name + "_shape", np.array([C], np.int64))
    b.node("ConstantOfShape", [shape], [name + "_zeros"],
           value=numpy_helper.from_array(np.array([0.25], np.float64), "fill"))
    b.node("Cast", [name + "_zeros"], [name], to=TensorProto.FLOAT)
    return name, np.full(C, 0.25, np.float32)


def identity_chain(b, name, rng):
    value = rng.standard_normal(C).astype(np.float32)
    b.node("Identity", [_const(b, name + "_source", value)], [name + "_1"])
    b.node("Identity", [name + "_1"], [name + "_2"])
    b.node("Identity", [name + "_2"], [name])
    return name, value


def where_of_constants(b, name, rng):
    condition = np.arange(C) % 2 == 0
    a, other = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    b.node("Where", [_const(b, name + "_cond", condition), _const(b, name + "_a", a), _const(b, name + "_b", other)],
           [name])
    return name, np.where(condition, a, other)


def dequantized(b, name, rng):
    quantized = rng.integers(-100, 100, C).astype(np.int8)
    b.node("DequantizeLinear", [_const(b, name + "_q", quantized), _const(b, name + "_scale", np.float32(0.02)),
                                _const(b, name + "_zero", np.int8(3))], [name])
    return name, ((quantized.astype(np.float32) - 3) * np.float32(0.02)).astype(np.float32)


def arithmetic(b, name, rng):
    source = rng.uniform(0.5, 2.0, C).astype(np.float32)
    b.node("Mul", [_const(b, name + "_x", source), _const(b, name + "_k", np.float32(3.0))], [name + "_m"])
    b.node("Sub", [name + "_m", _const(b, name + "_s", np.float32(0.5))], [name + "_d"])
    b.node("Sqrt", [name + "_d"], [name])
    return name, np.sqrt(source * np.float32(3) - np.float32(0.5))


def slice_gather_concat(b, name, rng):
    big = rng.standard_normal(2 * C).astype(np.float32)
    b.node("Slice", [_const(b, name + "_big", big), _const(b, name + "_start", np.array([1], np.int64)),
                     _const(b, name + "_end", np.array([1 + C // 2], np.int64))], [name + "_head"])
    indices = np.array([C + 1, 2, C], np.int64)[: C - C // 2]
    b.node("Gather", [name + "_big", _const(b, name + "_idx", indices)], [name + "_tail"], axis=0)
    b.node("Concat", [name + "_head", name + "_tail"], [name], axis=0)
    return name, np.concatenate([big[1:1 + C // 2], big[indices]])


def unsqueeze_squeeze(b, name, rng):
    value = rng.standard_normal(C).astype(np.float32)
    axes = _const(b, name + "_axes", np.array([0, 2], np.int64))
    b.node("Unsqueeze", [_const(b, name + "_v", value), axes], [name + "_u"])
    b.node("Squeeze", [name + "_u", axes], [name])
    return name, value


BUILDERS = [expand_of_scalar, cast_constant_of_shape, identity_chain, where_of_constants, dequantized,
            arithmetic, slice_gather_concat, unsqueeze_squeeze]


def _conv_bn(builder_for, seed=0):
    """x -> Conv (bias computed) -> BatchNormalization (every parameter computed) -> y."""
    rng = np.random.default_rng(seed)
    b = ModelBuilder(seed)
    x = b.input("x", [2, 3, 5, 5])
    bias, _ = builder_for("conv_bias")(b, "conv_bias", rng)
    b.node("Conv", [x, b.weight("w", [C, 3, 3, 3]), bias], ["conv"], name="conv", pads=[1, 1, 1, 1])
    params = []
    for role in ("scale", "bias", "mean", "var"):
        name, value = builder_for(role)(b, "bn_" + role, rng)
        if role == "var":  # a variance must be positive
            b.node("Abs", [name], ["bn_var_abs"])
            b.node("Add", ["bn_var_abs", _const(b, "bn_var_floor", np.float32(0.1))], ["bn_var_pos"])
            name = "bn_var_pos"
        params.append(name)
    b.node("BatchNormalization", ["conv"] + params, ["y"], name="bn")
    b.output("y", [2, C, 5, 5])
    return b.model(opset=15)


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda f: f.__name__)
def test_parameters_computed_from_constants_fold(builder):
    model = _conv_bn(lambda role: builder, seed=BUILDERS.index(builder))
    folded, report, error = fold_and_compare(model)
    assert outcome(report, "bn").action == "folded" and outcome(report, "bn").into == "Conv"
    assert count_ops(folded, "BatchNormalization") == 0
    assert [n.op_type for n in folded.graph.node] == ["Conv"], "the constant sub-graphs are left unused"
    assert error < TOLERANCE


def test_every_builder_mixed_in_one_model():
    model = _conv_bn(lambda role: BUILDERS[("conv_bias", "scale", "bias", "mean", "var").index(role) + 2])
    folded, report, error = fold_and_compare(model)
    assert outcome(report, "bn").action == "folded"
    assert error < TOLERANCE


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda f: f.__name__)
def test_builders_compute_what_the_reference_evaluator_computes(builder):
    # the test's own expected values, against onnx's reference evaluator of the same sub-graph
    from onnx.reference import ReferenceEvaluator

    b = ModelBuilder(0)
    name, expected = builder(b, "p", np.random.default_rng(5))
    b.output(name, [C], TensorProto.FLOAT)
    (value,) = ReferenceEvaluator(b.model(opset=21)).run(None, {})
    np.testing.assert_allclose(value, expected, rtol=1e-6)


# ---------------------------------------------------------------------- the size limit


def _node(op_type, n_inputs, **attributes):
    return helper.make_node(op_type, ["i%d" % i for i in range(n_inputs)], ["o"], **attributes)


def _int64(*values):
    return Constant(np.array(values, np.int64), TensorProto.INT64)


HUGE = [
    ("ConstantOfShape", lambda: (_node("ConstantOfShape", 1), [_int64(2**20, 2**20)])),
    ("Expand", lambda: (_node("Expand", 2), [Constant(np.ones(1, np.float32), TensorProto.FLOAT),
                                             _int64(1 << 40)])),
    ("Tile", lambda: (_node("Tile", 2), [Constant(np.ones((4, 4), np.float32), TensorProto.FLOAT),
                                         _int64(1 << 20, 1 << 20)])),
    ("Range", lambda: (_node("Range", 3), [Constant(np.array(0, np.int64), TensorProto.INT64),
                                           Constant(np.array(1 << 50, np.int64), TensorProto.INT64),
                                           Constant(np.array(1, np.int64), TensorProto.INT64)])),
    ("Add", lambda: (_node("Add", 2), [Constant(np.ones((1 << 16, 1), np.float32), TensorProto.FLOAT),
                                       Constant(np.ones((1, 1 << 16), np.float32), TensorProto.FLOAT)])),
]


@pytest.mark.parametrize("op_type, case", HUGE, ids=[h[0] for h in HUGE])
def test_a_huge_value_is_refused_before_anything_is_allocated(op_type, case):
    node, inputs = case()
    tracemalloc.start()
    try:
        with pytest.raises(ConstantTooLarge, match="larger than the 256 MiB"):
            evaluate_node(node, inputs, 17, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_value_just_under_the_limit_is_evaluated():
    elements = MAX_CONSTANT_BYTES // 4
    value = evaluate_node(_node("ConstantOfShape", 1), [_int64(elements)], 17, 0)
    assert value.array.shape == (elements,) and value.array.dtype == np.float32
    with pytest.raises(ConstantTooLarge):
        evaluate_node(_node("ConstantOfShape", 1), [_int64(elements + 1)], 17, 0)


def _huge_scale_model(op_type):
    """A BN whose scale is a small Slice of a huge value computed from constants."""
    b = ModelBuilder(0)
    x = b.input("x", [2, C, 4, 4])
    b.node("Conv", [x, b.weight("w", [C, C, 1, 1])], ["conv"], name="conv")
    if op_type == "ConstantOfShape":
        b.node("ConstantOfShape", [_const(b, "huge_shape", np.array([1 << 40], np.int64))], ["huge"],
               value=numpy_helper.from_array(np.array([1.0], np.float32), "fill"))
    elif op_type == "Expand":
        shape = _const(b, "huge_shape", np.array([1 << 40], np.int64))
        b.node("Expand", [_const(b, "one", np.ones(1, np.float32)), shape], ["huge"])
    elif op_type == "Tile":
        b.node("Tile", [_const(b, "one", np.ones(1, np.float32)), _const(b, "reps", np.array([1 << 40], np.int64))],
               ["huge"])
    else:
        b.node("Range", [_const(b, "start", np.float32(1)), _const(b, "limit", np.float32(2**40)),
                         _const(b, "delta", np.float32(1))], ["huge"])
    b.node("Slice", ["huge", _const(b, "s0", np.array([0], np.int64)), _const(b, "s1", np.array([C], np.int64))],
           ["scale"])
    _, bias, mean, var = b.batch_norm_params("bn", C)
    b.node("BatchNormalization", ["conv", "scale", bias, mean, var], ["y"], name="bn")
    b.output("y", [2, C, 4, 4])
    return b.model(opset=15)


@pytest.mark.parametrize("op_type", ["ConstantOfShape", "Expand", "Tile", "Range"])
def test_a_parameter_computed_from_a_huge_constant_is_refused_with_a_reason(op_type):
    from foldnorm.fold import fold_model

    tracemalloc.start()
    try:
        folded, report = fold_model(_huge_scale_model(op_type), verify=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bn = outcome(report, "bn")
    assert bn.action == "left"
    assert "'huge' is computed from constants by %s" % op_type in bn.reason
    assert "larger than the 256 MiB" in bn.reason
    assert count_ops(folded, "BatchNormalization") == 1
    assert peak < 64 << 20


def test_a_layer_weight_computed_from_a_huge_constant_is_refused_with_a_reason():
    from foldnorm.fold import fold_model

    b = ModelBuilder(0)
    x = b.input("x", [2, 4])
    b.node("ConstantOfShape", [_const(b, "huge_shape", np.array([1 << 20, 1 << 20], np.int64))], ["huge"],
           value=numpy_helper.from_array(np.array([1.0], np.float32), "fill"))
    b.node("Slice", ["huge", _const(b, "s0", np.array([0, 0], np.int64)), _const(b, "s1", np.array([4, C], np.int64))],
           ["w"])
    b.node("Gemm", [x, "w"], ["g"], name="gemm")
    b.batch_norm("g", "y", C, name="bn")
    b.output("y", [2, C])
    folded, report = fold_model(b.model(opset=15), verify=False)
    bn = outcome(report, "bn")
    assert bn.action == "left"
    assert "weight is not evaluated" in bn.reason and "larger than the 256 MiB" in bn.reason


def test_dynamo_style_conv_bias_of_cast_like_and_expand_folds():
    # torch's dynamo exporter (optimize=False) writes a bias-less Conv's bias as
    # Expand(CastLike(0, input), Expand(Shape(weight, end=1), [1])): CastLike reads only the input's type
    b = ModelBuilder(3)
    x = b.input("x", ["batch", 3, "height", "width"])
    weight = b.weight("w", [C, 3, 3, 3])
    b.node("Shape", [weight], ["out_channels"], end=1)
    b.node("Expand", ["out_channels", _constant_node(b, "one", np.array([1], np.int64))], ["bias_shape"])
    b.node("CastLike", [_constant_node(b, "zero", np.array(0.0, np.float32)), x], ["zero_like"])
    b.node("Expand", ["zero_like", "bias_shape"], ["bias"])
    b.node("Conv", [x, weight, "bias"], ["conv"], name="conv", pads=[1, 1, 1, 1])
    b.batch_norm("conv", "y", C, name="bn")
    b.output("y", ["batch", C, "height", "width"])
    model = b.model(opset=18)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)}
    folded, report, error = fold_and_compare(model, feeds)
    assert outcome(report, "bn").action == "folded" and outcome(report, "bn").into == "Conv"
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert error < TOLERANCE


def test_cast_like_of_a_value_of_unknown_type_is_not_evaluated():
    b = ModelBuilder(3)
    x = b.input("x", [2, 3, 4, 4])
    b.node("Relu", [x], ["r"])
    b.node("CastLike", [_constant_node(b, "zero", np.zeros(C, np.float32)), "mystery"], ["bias"])
    b.node("Conv", ["r", b.weight("w", [C, 3, 1, 1]), "bias"], ["conv"], name="conv")
    b.batch_norm("conv", "y", C, name="bn")
    b.output("y", [2, C, 4, 4])
    graph_model = b.model(opset=18)
    from foldnorm.fold.core.graph_index import GraphIndex, NameScope

    index = GraphIndex(graph_model.graph, path="main", names=NameScope(graph_model), opset=18,
                       inputs_are_constant=False, constants_as_nodes=False, types={})
    assert index.constant("bias") is None
    index = GraphIndex(graph_model.graph, path="main", names=NameScope(graph_model), opset=18,
                       inputs_are_constant=False, constants_as_nodes=False,
                       types={"mystery": (TensorProto.DOUBLE, None)})
    assert index.constant("bias").elem_type == TensorProto.DOUBLE
    assert index.constant("bias").array.dtype == np.float64


@pytest.mark.parametrize("integer, axis, per_axis", [(np.int8, 0, True), (np.uint8, 1, True), (np.int32, 0, False),
                                                     (np.int8, 1, False)])
def test_dequantize_linear_evaluates_as_onnxruntime(integer, axis, per_axis):
    rng = np.random.default_rng(7)
    info = np.iinfo(integer)
    low, high = max(info.min, -(1 << 30)), min(info.max, 1 << 30)
    quantized = rng.integers(low, high, (4, 3, 2), endpoint=True).astype(integer)
    channels = quantized.shape[axis] if per_axis else 1
    scale = rng.uniform(1e-4, 0.1, channels).astype(np.float32).reshape(-1 if per_axis else ())
    zero = rng.integers(max(low, -100), min(high, 100), channels).astype(integer).reshape(scale.shape)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis)
    inputs = [Constant(quantized, 0), Constant(scale, TensorProto.FLOAT), Constant(zero, 0)]
    value = evaluate_node(node, inputs, 13, 0)
    b = ModelBuilder(0)
    for name, array in (("q", quantized), ("s", scale), ("z", zero)):
        _const(b, name, array)
    b.nodes.append(node)
    b.output("y", list(quantized.shape), TensorProto.FLOAT)
    (expected,) = run_ort(b.model(opset=13), {}).values()
    assert value.elem_type == TensorProto.FLOAT and value.array.dtype == np.float32
    np.testing.assert_array_equal(value.array, expected)
