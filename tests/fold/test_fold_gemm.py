"""Backward folds into Gemm (any transA/transB/alpha/beta, C of every shape) and MatMul (2-D, with or
without a bias Add); the 3-D MatMul + BatchNormalization(axis 1) trap."""
import pytest

from tests.fold.fold_models import ModelBuilder, count_ops, fold_and_compare, outcome

FLOAT32_TOLERANCE = 2e-6
M, K, N = 5, 7, 6


def gemm_bn_model(trans_a, trans_b, alpha, beta, c_shape, seed=0):
    b = ModelBuilder(seed)
    a = b.input("a", [K, M] if trans_a else [M, K])
    inputs = [a, b.weight("w", [N, K] if trans_b else [K, N])]
    if c_shape is not None:
        inputs.append(b.weight("c", c_shape))
    b.node("Gemm", inputs, ["g"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    b.batch_norm("g", "y", N, name="bn")
    b.output("y", [M, N])
    return b.model()


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.25)])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (N,), (1, N), (M, 1), (M, N)],
                         ids=["no-C", "scalar", "1", "N", "1xN", "Mx1", "MxN"])
def test_gemm_batch_norm_folds_into_b_and_c(trans_a, trans_b, alpha, beta, c_shape):
    model = gemm_bn_model(trans_a, trans_b, alpha, beta, c_shape)
    folded, report, error = fold_and_compare(model)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    assert error < FLOAT32_TOLERANCE
    assert outcome(report, "bn").into == "Gemm"
    gemm = folded.graph.node[0]
    betas = [a.f for a in gemm.attribute if a.name == "beta"]
    assert betas in ([], [1.0])  # the new C already carries beta


def matmul_model(with_bias, bias_shape=(N,), bias_first=False, x_shape=(M, K), bn_channels=N, seed=0):
    b = ModelBuilder(seed)
    x = b.input("x", list(x_shape))
    b.node("MatMul", [x, b.weight("w", [K, N])], ["mm"], name="matmul")
    value = "mm"
    if with_bias:
        bias = b.weight("bias", bias_shape)
        b.node("Add", [bias, "mm"] if bias_first else ["mm", bias], ["biased"], name="bias_add")
        value = "biased"
    b.batch_norm(value, "y", bn_channels, name="bn")
    b.output("y", list(x_shape[:-1]) + [N])
    return b.model()


@pytest.mark.parametrize("with_bias, bias_shape, bias_first", [
    (False, None, False), (True, (N,), False), (True, (1, N), False), (True, (N,), True), (True, (), False)],
    ids=["no-bias", "bias-N", "bias-1xN", "bias-first", "scalar-bias"])
def test_matmul_2d_batch_norm_folds_into_weight_and_bias(with_bias, bias_shape, bias_first):
    model = matmul_model(with_bias, bias_shape, bias_first)
    folded, report, error = fold_and_compare(model)
    assert count_ops(folded, "BatchNormalization") == 0
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    assert error < FLOAT32_TOLERANCE
    assert outcome(report, "bn").into == "MatMul"


def test_3d_matmul_with_batch_norm_over_axis_1_is_not_folded_and_stays_correct():
    # (B, T, K) @ (K, N) -> (B, T, N); BN's axis 1 is T, not the N features of the weight.
    model = matmul_model(False, x_shape=(2, N, K), bn_channels=N)
    folded, report, error = fold_and_compare(model)
    assert count_ops(folded, "MatMul") == 1
    assert count_ops(folded, "BatchNormalization") == 1
    bn = outcome(report, "bn")
    assert bn.action == "left" and "kept as BatchNormalization" in bn.reason
    assert "3-D" in bn.reason
    assert error < FLOAT32_TOLERANCE
    weight = [t for t in folded.graph.initializer if t.name == "w"]
    assert weight, "the MatMul's weight must stay untouched"


def test_3d_matmul_trap_kept_as_batch_norm_with_keep_bn():
    model = matmul_model(True, x_shape=(2, N, K), bn_channels=N)
    folded, report, error = fold_and_compare(model, keep_bn=True)
    assert count_ops(folded, "BatchNormalization") == 1
    assert outcome(report, "bn").action == "left"
    assert error == 0.0


def test_gemm_followed_by_per_channel_add_and_mul_folds_into_c():
    b = ModelBuilder()
    a = b.input("a", [M, K])
    b.node("Gemm", [a, b.weight("w", [K, N])], ["g"], name="gemm", alpha=0.5)
    b.node("Add", ["g", b.weight("shift", [N])], ["g1"], name="add")
    b.node("Mul", ["g1", b.weight("scale", [1, N])], ["y"], name="mul")
    b.output("y", [M, N])
    model = b.model()
    folded, report, error = fold_and_compare(model)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    assert {o.node: o.into for o in report.outcomes} == {"add": "Gemm", "mul": "Gemm"}
    assert error < FLOAT32_TOLERANCE
