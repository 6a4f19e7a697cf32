"""Model builders and checks shared by the fold pass tests (tests/fold/).

Every model is built with onnx.helper and an explicit IR version (onnxruntime may refuse the newest).
The reference for a folded model is always the ORIGINAL model run in onnxruntime with graph optimizations
disabled (so onnxruntime folds nothing itself), on seeded random inputs.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from foldnorm.fold import fold_model
from foldnorm.fold.builder import IR_VERSION, ModelBuilder  # noqa: F401 (shared by the tests)
from tests.onnx_cases import run_ort  # noqa: F401 (shared by the tests)


def all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from all_nodes(subgraph)


def count_ops(model, op_type):
    return sum(1 for node in all_nodes(model.graph) if node.op_type == op_type)


def random_feeds(model, seed=1, shapes=None):
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        elem = value.type.tensor_type.elem_type
        shape = (shapes or {}).get(value.name) or [d.dim_value for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = np.array(rng.random(shape) < 0.5)
        else:
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def max_relative_error(original, folded, feeds):
    """max over outputs of max|folded - original| / max(max|original|, 1e-30), both run in onnxruntime."""
    expected = run_ort(original, feeds)
    actual = run_ort(folded, feeds)
    assert list(expected) == list(actual)
    worst = 0.0
    for name, reference in expected.items():
        got = actual[name]
        assert got.shape == reference.shape and got.dtype == reference.dtype, name
        reference = reference.astype(np.float64)
        scale = max(float(np.abs(reference).max()), 1e-30) if reference.size else 1.0
        error = float(np.abs(got.astype(np.float64) - reference).max()) if reference.size else 0.0
        worst = max(worst, error / scale)
    return worst


def fold_and_compare(model, feeds=None, *, check=True, **options):
    """Fold (without the built-in verification), check the result, compare it with the original in
    onnxruntime; returns (folded, report, max relative error)."""
    before = model.SerializeToString()
    folded, report = fold_model(model, verify=False, **options)
    assert model.SerializeToString() == before, "fold_model modified the caller's model"
    if check:
        onnx.checker.check_model(folded, full_check=True)
    feeds = random_feeds(model) if feeds is None else feeds
    return folded, report, max_relative_error(model, folded, feeds)


def outcome(report, node):
    (found,) = [o for o in report.outcomes if o.node == node]
    return found


def conv_bn_model(rank=2, channels_in=4, channels_out=6, group=1, bias=True, kernel=3, pads=1, opset=15,
                  dtype=np.float32, seed=0, bn_attributes=None):
    """x -> Conv -> BatchNormalization -> y."""
    b = ModelBuilder(seed, dtype)
    spatial = [7, 6, 5][:rank]
    x = b.input("x", [2, channels_in] + spatial)
    weight_shape = [channels_out, channels_in // group] + [kernel] * rank
    inputs = [x, b.weight("w", weight_shape)]
    if bias:
        inputs.append(b.weight("w_bias", (channels_out,)))
    b.node("Conv", inputs, ["conv_out"], name="conv", group=group, pads=[pads] * (2 * rank))
    b.batch_norm("conv_out", "y", channels_out, name="bn", **(bn_attributes or {}))
    b.output("y", [2, channels_out] + [s + 2 * pads - kernel + 1 for s in spatial])
    return b.model(opset=opset)


def run_reference(model, feeds):
    """Every output of a model from onnx's reference evaluator (for opsets onnxruntime does not know yet)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    names = [o.name for o in model.graph.output]
    return dict(zip(names, evaluator.run(names, feeds)))


def bfloat16_as_float32(model):
    """A copy of the model with every bfloat16 tensor, type and Cast turned into float32 -- exact for the
    values, so onnxruntime (which has no bfloat16 Conv/Gemm on CPU) can run what the model computes up to
    the rounding of intermediate results."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)

    def convert_tensor(tensor):
        if tensor.data_type == TensorProto.BFLOAT16:
            values = numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))

    def convert_graph(graph):
        for tensor in graph.initializer:
            convert_tensor(tensor)
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            if value.type.tensor_type.elem_type == TensorProto.BFLOAT16:
                value.type.tensor_type.elem_type = TensorProto.FLOAT
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    convert_tensor(attribute.t)
                if attribute.name == "to" and attribute.i == TensorProto.BFLOAT16:
                    attribute.i = TensorProto.FLOAT

    convert_graph(copy.graph)
    return copy
