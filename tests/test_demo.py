"""`foldnorm demo`: the fold of the embedded CNN verifies, and the numbers it reports make sense."""
import math

import numpy as np
import onnxruntime as ort
import pytest

from foldnorm.cli import main
from foldnorm.demo import build_demo_model, count_ops, demo_results, run_demo
from foldnorm.fold import fold_model

# What the demo model holds, by construction (see build_demo_model): where each of its 10 BNs must go.
EXPECTED_FOLDED = {"Conv": 4, "across Add": 1, "across Concat": 1, "Conv (forward)": 1, "Gemm (forward)": 1, "Gemm": 1}


@pytest.fixture(scope="module")
def quick_results():
    lines = []
    results = demo_results(quick=True, echo=lines.append)
    return results, "\n".join(lines)


def test_the_demo_folds_every_bn_but_the_one_before_a_padded_conv(quick_results):
    results, _ = quick_results
    counts = results["report"].counts()
    assert results["bns_before"] == 10 and results["bns_after"] == 1
    assert counts["folded"] == EXPECTED_FOLDED
    assert counts["rewritten"] == 0 and counts["left"] == 1
    left = [o.node for o in results["report"].outcomes if o.action == "left"]
    assert left == ["input_bn"]


def test_the_demo_fold_verifies_within_tolerance(quick_results):
    results, text = quick_results
    verification = results["report"].verification
    assert results["ok"] and verification.passed
    (logits,) = verification.outputs
    assert logits.name == "logits" and 0.0 < logits.max_rel_error < 1e-5
    assert "%.3g" % logits.max_abs_error in text


def test_the_demo_fold_matches_the_original_on_other_inputs():
    model = build_demo_model(image_size=64)
    folded, _ = fold_model(model, verify=False)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(42).uniform(-3, 3, (1, 3, 64, 64)).astype(np.float32)
    expected, got = (ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                     .run(None, {"image": x})[0].astype(np.float64) for m in (model, folded))
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_keep_bn_leaves_only_the_bn_before_the_padded_conv():
    folded, report = fold_model(build_demo_model(image_size=64), keep_bn=True, verify=True)
    assert count_ops(folded, "BatchNormalization") == 1
    assert [o.node for o in report.outcomes if o.action == "left"] == ["input_bn"]


def test_the_demo_reports_latencies_and_kernel_errors(quick_results):
    results, text = quick_results
    assert set(results["latency"]) == {"disabled", "enabled (ORT_ENABLE_ALL)"}
    for before, after in results["latency"].values():
        assert 0.0 < before < 1.0 and 0.0 < after < 1.0
    kernels = results["kernels"]
    assert kernels is not None, "the kernels are not built"
    assert {"batch_norm (inference)", "batch_norm_train", "layer_norm (C,H,W)", "rms_norm (C,H,W)",
            "instance_norm"} <= set(kernels)
    for name, row in kernels.items():
        assert row["max_rel_error"] <= 1e-5, name
        assert math.isfinite(row["seconds"]) and row["seconds"] > 0.0
        assert name in text
    assert results["seconds"] < 60.0


def test_run_demo_and_the_command_return_zero(capsys):
    assert run_demo(quick=True) == 0
    assert "demo finished" in capsys.readouterr().out
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime latency" in out and "kernels on a (2, 16, 28, 28) float32 activation" in out
    assert "  threads: on a shared machine the calling thread works too and never waits for a worker" in out
