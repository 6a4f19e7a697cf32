"""Folding BatchNormalization in quantized (QDQ) models built by hand: quantization-aware-style graphs
(DequantizeLinear(integer weight) -> layer -> BN -> Q -> DQ) and post-training-style graphs (layer -> Q -> DQ
-> BN), checked against onnxruntime on the original model in quantization steps of the output, and the new
weights against a float64 NumPy reference of a * dequantized weight."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from foldnorm.fold import fold_model
from foldnorm.fold.builder import ModelBuilder
from tests.onnx_cases import run_ort

EPS = 1e-5
Y_SCALE = 0.07  # the output's quantization step


def optimized_ops(model, tmp_path, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}


def qdq(b, x, scale, zero_point, name, dtype=np.uint8):
    """x -> QuantizeLinear -> DequantizeLinear (per tensor) in builder `b`; returns the DequantizeLinear's output."""
    s = b.constant(name + "_s", np.float32(scale))
    z = b.constant(name + "_z", dtype(zero_point), dtype)
    q = b.node("QuantizeLinear", [x, s, z], [name + "_q"], name=name + "_q_node")
    return b.node("DequantizeLinear", [q, s, z], [name + "_dq"], name=name + "_dq_node")


def dequantize(b, name, integers, scale, zero_point=None, axis=None):
    """DequantizeLinear of constants in builder `b`: the integers, the scale, the zero point."""
    inputs = [b.constant(name + "_q", integers, integers.dtype), b.constant(name + "_s", scale, np.float32)]
    if zero_point is not None:
        inputs.append(b.constant(name + "_z", zero_point, integers.dtype))
    return b.node("DequantizeLinear", inputs, [name], name=name + "_node", **({} if axis is None else {"axis": axis}))


def bn_params(rng, channels, negative=(), zero=(), magnitudes=None):
    """BN parameters whose map has scale a = gamma / sqrt(var + eps): negative where asked, zero where asked,
    and |a| == magnitudes[c] when given."""
    var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    if magnitudes is None:
        magnitudes = rng.uniform(0.5, 2.0, channels)
    gamma = np.asarray(magnitudes) * np.sqrt(var.astype(np.float64) + EPS)
    gamma[list(negative)] *= -1
    gamma[list(zero)] = 0.0
    return [gamma.astype(np.float32), rng.standard_normal(channels).astype(np.float32),
            rng.standard_normal(channels).astype(np.float32), var]


def bn_affine(params):
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    a = gamma / np.sqrt(var + EPS)
    return a, beta - a * mean


LAYERS = {
    # op: (weight shape, input shape, output channels, weight axis, attributes)
    "Conv": ((6, 4, 3, 3), [1, 4, 6, 6], 6, 0, {}),
    "ConvTranspose": ((4, 3, 2, 2), [1, 4, 5, 5], 6, 1, {"group": 2, "strides": [2, 2]}),
    "Gemm": ((6, 5), [3, 5], 6, 0, {"transB": 1}),
    "MatMul": ((5, 6), [3, 5], 6, 1, {}),
}
OUTPUT_SHAPES = {"Conv": [1, 6, 4, 4], "ConvTranspose": [1, 6, 10, 10], "Gemm": [3, 6], "MatMul": [3, 6]}


def build(op="Conv", *, dtype=np.int8, per_channel=True, zero_point=0, negative=(0, 3), zero=(), magnitudes=None,
          bias="int32", through_qdq=False, bn_dequantized=False, opset=15, integers=None, scales=None, seed=0):
    """A QDQ model around one layer and one BN; returns (model, facts) with the layer's float64 reference
    values for the checks."""
    b = ModelBuilder(seed)
    rng = b.rng
    bias = "none" if op == "MatMul" else bias
    w_shape, x_shape, channels, axis, attributes = LAYERS[op]
    low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
    if integers is None:
        integers = rng.integers(max(low, -high), high + 1, size=w_shape).astype(dtype)  # no -128: see below
    slots = w_shape[axis]
    if scales is None:
        scales = rng.uniform(0.002, 0.02, slots) if per_channel else np.float64(0.01)
    scales = np.asarray(scales, np.float32)
    zps = np.full(slots, zero_point) if per_channel else np.asarray(zero_point)
    x = qdq(b, "x_in", 0.02, 128, "x")
    weight = dequantize(b, "w", integers, scales, zps.astype(dtype), axis if per_channel else None)
    inputs = [x, weight]
    x_scale = np.float32(0.02)
    if bias == "int32":
        bias_scale = (x_scale * scales).astype(np.float32)
        if op == "ConvTranspose" and per_channel:  # output channel g * 3 + j has weight scale j
            bias_scale = np.tile(bias_scale, attributes["group"])
        bias_int = rng.integers(-2000, 2000, channels).astype(np.int32)
        inputs.append(dequantize(b, "bias", bias_int, bias_scale if per_channel else bias_scale.reshape(()),
                                   np.zeros(np.shape(bias_scale), np.int32), 0 if per_channel else None))
    elif bias == "float":
        inputs.append(b.constant("bias", rng.standard_normal(channels)))
    layer = b.node(op, inputs, ["layer"], name="layer_node", **attributes)
    if through_qdq:
        layer = qdq(b, layer, 0.1, 128, "layer_out")  # wide enough that it does not clip the layer's output
    params = bn_params(rng, channels, negative, zero, magnitudes)
    names = []
    for role, values in zip(("scale", "bias", "mean", "var"), params):
        if bn_dequantized and role in ("scale", "bias"):
            step = np.float32(np.abs(values).max() / 100)
            q = np.round(values / step).astype(np.int8)
            params[("scale", "bias").index(role)] = (q * step).astype(np.float32)
            names.append(dequantize(b, "bn_" + role, q, step))
        else:
            names.append(b.constant("bn_" + role, values))
    b.node("BatchNormalization", [layer] + names, ["bn"], name="bn_node", epsilon=EPS)
    y = qdq(b, "bn", Y_SCALE, 128, "y")
    b.input("x_in", x_shape)
    b.output(y, OUTPUT_SHAPES[op])
    model = b.model(opset=opset)
    along = _along(axis, len(w_shape), per_channel)
    reference = (integers.astype(np.float64) - np.asarray(zps, np.float64).reshape(along)) \
        * scales.astype(np.float64).reshape(along)
    return model, {"weight": reference, "affine": bn_affine(params), "axis": axis, "op": op, "dtype": dtype,
                   "x_shape": x_shape, "attributes": attributes}


def _along(axis, ndim, per_channel):
    shape = [1] * ndim
    if per_channel:
        shape[axis] = -1
    return shape


def channel_factor(facts, weight_shape):
    """The map's scale per weight element (the output channel of each element)."""
    a = facts["affine"][0]
    op, attributes = facts["op"], facts["attributes"]
    if op == "Conv":
        return a.reshape(-1, 1, 1, 1)
    if op == "ConvTranspose":
        group, rows, per_group = attributes["group"], weight_shape[0], weight_shape[1]
        out = (np.arange(rows) // (rows // group))[:, None] * per_group + np.arange(per_group)[None, :]
        return a[out][:, :, None, None]
    return a[:, None] if op == "Gemm" else a[None, :]


def layer_weight(model):
    """(integers, scale, zero point, axis) of the folded layer's weight, and its integer type."""
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    layer = next(n for n in graph.node if n.op_type in LAYERS)
    dq = next(n for n in graph.node if n.output[0] == layer.input[1])
    assert dq.op_type == "DequantizeLinear"
    q, s = inits[dq.input[0]], inits[dq.input[1]]
    zp = inits[dq.input[2]] if len(dq.input) > 2 else np.zeros_like(s, dtype=q.dtype)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    return q, s, zp, axis


def dequantized(q, s, zp, axis):
    shape = [1] * q.ndim
    if np.size(s) > 1:
        shape[axis] = -1
    return (q.astype(np.float64) - zp.astype(np.float64).reshape(shape)) * s.astype(np.float64).reshape(shape)


def steps_apart(original, folded, x_shape, seed=0):
    feeds = {"x_in": np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)}
    (expected,), (actual,) = run_ort(original, feeds).values(), run_ort(folded, feeds).values()
    return float(np.abs(actual.astype(np.float64) - expected).max() / Y_SCALE)


def check_exact_fold(model, facts, tmp_path=None, requantized=()):
    folded, report = fold_model(model)
    (outcome,) = report.normalizations()
    assert outcome.action == "folded", outcome.reason
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    onnx.checker.check_model(folded, full_check=True)
    q, s, zp, axis = layer_weight(folded)
    assert q.dtype == facts["dtype"] and (s.size == 1 or axis == facts["axis"])
    expected = facts["weight"] * channel_factor(facts, q.shape)
    got = dequantized(q, s, zp, axis)
    plan = outcome.quantized
    assert sorted(plan.requantized) == sorted(requantized)
    moved = np.abs(got - expected)
    for c in range(len(facts["affine"][0])):
        in_channel = np.broadcast_to(_channel_index(facts, q.shape) == c, q.shape)
        tolerance = 1e-6 * np.abs(expected[in_channel]).max(initial=1e-30)
        if c in requantized:
            step = float(np.abs(facts["affine"][0][c])) * _slot_scale(facts, model, q.shape, c)
            assert moved[in_channel].max() <= plan.weight_steps * step * (1 + 1e-6) + tolerance
            assert plan.weight_steps <= 1.0
        else:
            assert moved[in_channel].max() <= tolerance, c
    (comparison,) = report.verification.outputs
    assert report.verification.passed and comparison.step_tolerance == (1.0 if not requantized else 3.0)
    assert steps_apart(model, folded, facts["x_shape"]) <= comparison.step_tolerance + 1e-6
    return folded, report, plan


def _channel_index(facts, weight_shape):
    channels = np.arange(len(facts["affine"][0])).astype(np.float64)
    return channel_factor({**facts, "affine": (channels, None)}, weight_shape)


def _slot_scale(facts, model, shape, channel):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scale = inits["w_s"].astype(np.float64)
    if scale.size == 1:
        return float(scale)
    if facts["op"] == "ConvTranspose":
        return float(scale[channel % shape[1]])
    return float(scale[channel])


@pytest.mark.parametrize("op", sorted(LAYERS))
@pytest.mark.parametrize("dtype,zero_point", [(np.int8, 0), (np.uint8, 128)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_exact_fold_per_layer_kind(op, dtype, zero_point, per_channel):
    # integers kept clear of the ends of the range, so negation stays inside it
    w_shape, _, channels, axis, attributes = LAYERS[op]
    rng = np.random.default_rng(1)
    integers = (rng.integers(-100, 101, size=w_shape) + zero_point).astype(dtype)
    magnitudes = None
    if op == "ConvTranspose":  # column j of both groups shares scale j: the same |a| in both keeps it exact
        magnitudes = np.tile(rng.uniform(0.5, 2.0, channels // 2), 2)
    model, facts = build(op, dtype=dtype, per_channel=per_channel, zero_point=zero_point, integers=integers,
                         magnitudes=magnitudes, negative=(0, 4))
    folded, report, plan = check_exact_fold(model, facts)
    assert plan.exact and plan.negated == [0, 4]
    assert plan.granularity == ("per-channel" if per_channel else "per-tensor -> per-channel")
    assert plan.bias == ("float" if op == "MatMul" else "int32")
    assert plan.bias_steps <= 0.5 + 1e-9


def test_int8_minus_128_under_negation_is_requantized_by_half_a_step():
    rng = np.random.default_rng(2)
    integers = rng.integers(-127, 128, size=(6, 4, 3, 3)).astype(np.int8)
    integers[3, 0, 0, 0] = -128  # channel 3 is negated: +128 does not fit int8
    integers[1, 0, 0, 0] = -128  # channel 1 is not negated: -128 stays
    model, facts = build("Conv", integers=integers, negative=(0, 3))
    folded, report, plan = check_exact_fold(model, facts, requantized=(3,))
    assert plan.negated == [0]
    assert 0.0 < plan.weight_steps <= 0.5 * 128 / 127 + 1e-6
    assert "requantized" in report.normalizations()[0].reason


def test_uint8_asymmetric_negation_in_range_is_exact_and_out_of_range_requantized():
    rng = np.random.default_rng(3)
    integers = rng.integers(30, 171, size=(6, 4, 3, 3)).astype(np.uint8)  # zp 100: 2*100 - q in [29, 170]
    model, facts = build("Conv", dtype=np.uint8, zero_point=100, integers=integers, negative=(1, 2))
    _, _, plan = check_exact_fold(model, facts)
    assert plan.exact and plan.negated == [1, 2]
    integers[2, 0, 0, 0] = 0  # 2*100 - 0 = 200 fits; 255 does not: 2*100 - 255 < 0
    integers[2, 0, 0, 1] = 255
    model, facts = build("Conv", dtype=np.uint8, zero_point=100, integers=integers, negative=(1, 2))
    _, _, plan = check_exact_fold(model, facts, requantized=(2,))
    assert plan.negated == [1]


def test_zero_scale_and_zero_map_channels_stay_exact():
    scales = np.random.default_rng(4).uniform(0.002, 0.02, 6)
    scales[2] = 0.0
    model, facts = build("Conv", scales=scales, zero=(4,), negative=(0,))
    folded, _, plan = check_exact_fold(model, facts)
    q, s, zp, _ = layer_weight(folded)
    assert s[2] == 0.0 and np.all(q[4] == zp[4]) and s[4] > 0


def test_non_finite_weight_scale_is_rewritten_with_the_reason():
    scales = np.random.default_rng(5).uniform(0.002, 0.02, 6)
    scales[1] = np.inf
    model, _ = build("Conv", scales=scales, bias="float")
    folded, report = fold_model(model, verify=False)
    (outcome,) = report.normalizations()
    assert outcome.action == "left"
    assert "scale of its weight slot 1 is inf" in outcome.reason


def test_grouped_conv_transpose_shared_scale():
    """Column j of every group shares scale j: a 1.5x |a| spread is requantized (<= 0.75 step), a 3x
    spread would move weights by more than a step, so the BN becomes Mul/Add and the report says why."""
    magnitudes = np.array([1.0, 1.0, 1.0, 1.5, 1.0, 1.0])  # channel 3 (group 1, column 0) shares with 0
    model, facts = build("ConvTranspose", magnitudes=magnitudes, negative=(1, 4))
    _, _, plan = check_exact_fold(model, facts, requantized=(0,))
    assert plan.weight_steps <= 0.75 + 1e-6
    magnitudes[3] = 3.0
    model, _ = build("ConvTranspose", magnitudes=magnitudes)
    _, report = fold_model(model)
    (outcome,) = report.normalizations()
    assert outcome.action == "left"
    assert "shares one weight scale" in outcome.reason


@pytest.mark.parametrize("bias", ["none", "float", "int32"])
def test_bias_forms(bias, tmp_path):
    model, facts = build("Conv", bias=bias)
    folded, report, plan = check_exact_fold(model, facts)
    # a missing bias becomes int32 too (the input comes from DequantizeLinear): the integer Conv stays fusable
    assert plan.bias == ("float" if bias == "float" else "int32")
    if bias != "float":  # the BN between Conv and QuantizeLinear kept onnxruntime from fusing; now it does
        assert "QLinearConv" not in optimized_ops(model, tmp_path)
        assert "QLinearConv" in optimized_ops(folded, tmp_path)


def test_bn_parameters_from_dequantize_linear_are_read_as_constants():
    model, facts = build("Conv", bn_dequantized=True)
    _, report, plan = check_exact_fold(model, facts)
    assert plan.exact


def test_opset_12_per_tensor():
    """Before opset 13 DequantizeLinear has no axis: equal |a| stays per-tensor and exact; different |a|
    cannot, and the report says why."""
    model, facts = build("Conv", per_channel=False, opset=12, magnitudes=np.full(6, 1.25), negative=(2,),
                         integers=np.random.default_rng(6).integers(-100, 101, (6, 4, 3, 3)).astype(np.int8))
    folded, _, plan = check_exact_fold(model, facts)
    assert plan.granularity == "per-tensor" and layer_weight(folded)[1].size == 1
    model, _ = build("Conv", per_channel=False, opset=12)
    _, report = fold_model(model)
    (outcome,) = report.normalizations()
    assert outcome.action == "left" and "before opset 13" in outcome.reason and "opset 12)" in outcome.reason


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_through_qdq_only_with_the_switch(op, tmp_path):
    model, facts = build(op, through_qdq=True)
    folded, report = fold_model(model)
    (outcome,) = report.normalizations()
    assert outcome.action == "left" and "fold_through_qdq=True" in outcome.reason
    assert report.verification.passed
    assert steps_apart(model, folded, facts["x_shape"]) == 0.0
    _, report = fold_model(model, keep_bn=True)
    assert report.normalizations()[0].action == "left"

    folded, report = fold_model(model, fold_through_qdq=True)
    (outcome,) = report.normalizations()
    assert outcome.action == "folded" and outcome.quantized.through_qdq and not outcome.quantized.exact
    ops = [n.op_type for n in folded.graph.node]
    assert "BatchNormalization" not in ops and ops.count("QuantizeLinear") == 2  # the input's and the output's
    onnx.checker.check_model(folded, full_check=True)
    (comparison,) = report.verification.outputs
    assert comparison.step_tolerance == 3.0 and comparison.max_steps <= 3.0
    assert comparison.max_steps == pytest.approx(steps_apart(model, folded, facts["x_shape"]), abs=1e-3)
    if op == "Conv":
        assert "QLinearConv" in optimized_ops(folded, tmp_path)


def test_verification_in_steps_catches_a_wrong_fold():
    model, facts = build("Conv")
    folded, _ = fold_model(model, verify=False)
    from foldnorm.fold.verification.runner import verify

    scale = next(t for t in folded.graph.initializer if t.name.endswith("folded_weight_scale"))
    values = numpy_helper.to_array(scale).copy()
    values[0] *= 1.5
    scale.CopyFrom(numpy_helper.from_array(values, scale.name))
    result = verify(model, folded)
    (comparison,) = result.outputs
    assert not result.passed and comparison.max_steps > 1.0
    assert comparison.max_steps == pytest.approx(steps_apart(model, folded, facts["x_shape"]), abs=1e-3)


@pytest.mark.parametrize("op,kernel", [("Conv", "QLinearConv"), ("Gemm", "QGemm"), ("MatMul", "QGemm")])
def test_onnxruntime_runs_the_folded_layer_as_an_integer_kernel(op, kernel, tmp_path):
    model, _ = build(op)
    folded, _ = fold_model(model)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        ops = optimized_ops(folded, tmp_path, level)
        assert kernel in ops and "BatchNormalization" not in ops and op not in ops
