"""The big-model benchmark runs each contender, and the model `foldnorm fold` wrote there is right."""
import numpy as np
import onnxruntime as ort

from benchmarks import big_model


def run_path(path, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_the_benchmark_runs_every_contender_and_the_fold_is_right(tmp_path):
    case = big_model.run_case(2.0, 2, 1, str(tmp_path))
    assert case["failures"] == []
    assert set(case["contenders"]) == {"onnxruntime_optimizer", "foldnorm_no_verify", "foldnorm_verify"}
    for figures in case["contenders"].values():
        assert figures["seconds_median"] > 0 and figures["peak_bytes_max"] > 2**20
    assert case["model_bytes"] > case["tensor_bytes"] > 1.9e6
    for name in ("foldnorm_no_verify", "foldnorm_verify"):
        assert case["contenders"][name]["time_vs_onnxruntime"] > 0
    channels = case["channels"]
    x = np.random.default_rng(0).standard_normal((1, channels, big_model.SPATIAL, big_model.SPATIAL))
    feeds = {"input": x.astype(np.float32)}
    expected = run_path(tmp_path / "model.onnx", feeds)
    for folded in ("folded.onnx", "folded_nv.onnx"):
        got = run_path(tmp_path / folded, feeds)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    table = big_model.format_case("big", case)
    assert "| foldnorm_no_verify |" in table and "memory budget" in table
