"""The benchmark harness's logic: pairing, targets, compare's verdicts and exit codes, the outputs of a tiny
run, and the models it builds. No timing is asserted: these machines are too noisy for that."""
import importlib.util
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import foldnorm
from benchmarks import cache_memory, fold_scaling, kernels, models, report, runner
from benchmarks.__main__ import main
from benchmarks.harness import Contender, Samples, Unavailable, measure, paired_ratio
from benchmarks.machine import caches, caches_text

# Under `make asan` (libasan preloaded) importing matplotlib aborts the interpreter: its C++ extension
# throws at import, and ASan's __cxa_throw interceptor is not set up for libraries loaded after it.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def test_measure_interleaves_and_times_sparse_contenders_only_in_the_first_rounds():
    calls = []
    contenders = [Contender(name, 1, lambda name=name: calls.append(name)) for name in "abc"]
    contenders.append(Contender("slow", 1, lambda: calls.append("slow"), sparse=True))
    samples = measure(contenders, repeats=5, warmup=1, sparse_repeats=2)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up skips the sparse contender
    rounds = calls[3:]
    assert rounds[:4] == ["a", "b", "c", "slow"]
    assert rounds[4:8] == ["b", "c", "slow", "a"]  # each round starts one contender later
    assert {key: len(s.by_round) for key, s in samples.items()} == {"a@1": 5, "b@1": 5, "c@1": 5, "slow@1": 2}
    assert sorted(samples["slow@1"].by_round) == [0, 1]


def test_paired_ratio_uses_only_rounds_both_ran():
    numerator = Samples({0: 1.0, 1: 4.0, 2: 30.0, 3: 3.0})
    denominator = Samples({0: 1.0, 1: 2.0, 3: 1.0, 4: 50.0})
    assert paired_ratio(numerator, denominator) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert paired_ratio(numerator, Samples({9: 1.0})) is None
    assert Samples({0: 3.0, 1: 1.0, 2: 2.0}).summary() == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_byte_model():
    assert kernels.KernelCase("batch_norm", (2, 3, 4, 5)).traffic_bytes == 2 * 120 * 4
    assert kernels.KernelCase("batch_norm_train", (2, 3, 4, 5)).traffic_bytes == 3 * 120 * 4
    assert kernels.KernelCase("batch_norm_backward", (2, 3, 4, 5)).traffic_bytes == 5 * 120 * 4
    assert kernels.KernelCase("layer_norm_backward", (6, 7)).traffic_bytes == 3 * 42 * 4
    assert set(kernels.TRAFFIC) == set(kernels.BENCHES)


def _ratio(value):
    return {"median": value, "min": value, "max": value, "n": 1}


def _row(threads, x_copy=1.0, vs_torch=None, vs_ort=None, scaling=None):
    return {"threads": threads, "x_copy": _ratio(x_copy), "vs_torch": vs_torch and _ratio(vs_torch),
            "vs_onnxruntime": vs_ort and _ratio(vs_ort), "scaling": scaling and _ratio(scaling)}


def test_targets_are_judged_at_all_cores_from_the_runs_own_ratios():
    bn = kernels.KernelCase("batch_norm", kernels.BATCH_NORM_HEADLINE).key
    train = kernels.KernelCase("batch_norm_train", kernels.BATCH_NORM_HEADLINE).key
    ln = kernels.KernelCase("layer_norm", kernels.LAYER_NORM_HEADLINE).key
    gn = kernels.KernelCase("group_norm", kernels.GROUP_NORM_HEADLINE, groups=32).key
    results = [
        {"key": bn, "rows": [_row(1, x_copy=2.0), _row(2, x_copy=1.05)]},
        {"key": train, "rows": [_row(1, x_copy=1.5), _row(2, x_copy=1.7, scaling=1.4)]},
        {"key": ln, "rows": [_row(1), _row(2, vs_torch=1.2, vs_ort=1.4)]},
        {"key": gn, "skipped": "foldnorm.group_normalization.group_norm is not available yet"},
    ]
    verdicts = {(v["key"], v["kind"], v["limit"]): v for v in report.evaluate_targets(results)}
    assert len(verdicts) == len(report.TARGETS)
    assert verdicts[bn, "x_copy", 1.1]["met"] is True
    assert verdicts[train, "x_copy", 1.6]["met"] is False
    assert verdicts[train, "scaling", 1.6]["met"] is False
    assert verdicts[ln, "vs", 1.0]["met"] is True
    assert verdicts[ln, "vs", 1.5]["met"] is False
    assert verdicts[gn, "vs", 1.0]["met"] is None
    assert "not available" in verdicts[gn, "vs", 1.0]["why"]
    backward = kernels.KernelCase("batch_norm_backward", kernels.BATCH_NORM_HEADLINE).key
    assert verdicts[backward, "x_copy", 2.5]["met"] is None


def _results_file(path, figures):
    with open(path, "w") as f:
        json.dump({"figures": {name: {"value": v, "unit": "s"} for name, v in figures.items()}}, f)
    return str(path)


def test_compare_flags_slowdowns_beyond_the_threshold(tmp_path, capsys):
    old = _results_file(tmp_path / "old.json", {"a": 1.0, "b": 2.0, "gone": 1.0})
    new = _results_file(tmp_path / "new.json", {"a": 1.05, "b": 2.5, "added": 1.0})
    assert main(["compare", old, new]) == 1
    out = capsys.readouterr().out
    line_a, = [line for line in out.splitlines() if line.startswith("| a |")]
    line_b, = [line for line in out.splitlines() if line.startswith("| b |")]
    assert "1.050" in line_a and "SLOWER" not in line_a
    assert "1.250" in line_b and "SLOWER" in line_b
    assert "2 figures compared, 1 slower" in out
    assert "Only in OLD (not compared): gone" in out and "Only in NEW (not compared): added" in out
    assert main(["compare", old, new, "--threshold", "0.3"]) == 0
    assert main(["compare", new, old]) == 0  # faster is never flagged


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"mode": "quick"}', '{"figures": {"a": {"value": 0}}}',
                                     '{"figures": {"a": {"value": "1"}}}'])
def test_compare_rejects_bad_files_with_one_line_and_exit_code_2(tmp_path, capsys, content):
    good = _results_file(tmp_path / "good.json", {"a": 1.0})
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["compare", good, str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks compare: ") and err.count("\n") == 1
    assert main(["compare", str(tmp_path / "missing.json"), good]) == 2


def test_a_case_leaves_the_default_thread_counts_as_it_found_them():
    from foldnorm.kernels.runtime import get_num_threads, set_num_threads

    before = get_num_threads()
    set_num_threads(1)  # not the last count the case runs (counts above the cores are capped)
    try:
        result = kernels.run_case(kernels.KernelCase("layer_norm", (16, 64)), [1, 2], repeats=1)
        assert "rows" in result or result["skipped"]
        assert get_num_threads() == 1
        torch = sys.modules.get("torch")
        if torch is not None:
            assert torch.get_num_threads() in (1, before)
    finally:
        set_num_threads(before)


def test_a_kernel_that_is_not_there_yet_is_skipped_with_a_note(monkeypatch):
    def missing(name):
        raise Unavailable("foldnorm.%s is not available in this build" % name)

    monkeypatch.setattr(kernels, "foldnorm_function", missing)
    result = kernels.run_case(kernels.KernelCase("layer_norm", (4, 8)), [1], repeats=1)
    assert result["skipped"] == "foldnorm.layer_norm is not available in this build"
    assert "rows" not in result


def test_smoke_run_writes_table_json_and_plots(tmp_path, capsys):
    args = ["run", "--smoke", "--out", str(tmp_path), "--threads", "2,1"]
    assert main(args + (["--no-plots"] if UNDER_ASAN else [])) == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().strip() == table.strip()
    machine = results["machine"]
    assert machine["threads"] == [1, 2]
    assert set(machine["copy_gbps"]) == {"1", "2"} and all(v > 0 for v in machine["copy_gbps"].values())
    assert machine["versions"]["onnxruntime"] == ort.__version__
    assert {"openmp", "max_threads", "compiler", "cflags"} <= set(machine["foldnorm_build"])
    assert machine["topology"]["logical_cpus"] >= 1 and "OMP_PROC_BIND" in machine["binding"]
    assert set(results["machine_check"]) == {"busy", "reasons", "numbers"}
    assert results["machine_check"]["busy"] == ("**BUSY MACHINE" in table)
    assert [r["key"] for r in results["kernels"]] == [c.key for c in kernels.SMOKE_CASES]
    for result in results["kernels"]:
        assert result["label"] in table
        if "skipped" in result:
            assert result["skipped"]
            continue
        assert [row["threads"] for row in result["rows"]] == [1, 2]
        for row in result["rows"]:
            assert row["foldnorm"]["min"] <= row["foldnorm"]["median"] <= row["foldnorm"]["max"]
            assert row["gbps"] > 0 and row["x_copy"]["n"] == 2
            if row["threads"] == 2:  # the speed-up over 1 thread, against the copy's own
                assert row["efficiency"]["n"] == 2 and row["efficiency"]["min"] <= row["efficiency"]["max"]
            else:
                assert row["efficiency"] is None
            assert "kernel/%s/t%d/seconds" % (result["key"], row["threads"]) in results["figures"]
        assert result["max_abs_error"] < 1e-3
    assert len(results["targets"]) == len(report.TARGETS)
    assert all(t["met"] is None for t in results["targets"])  # the smoke run has none of the headline shapes
    assert machine["foldnorm_build"]["vector_path"] == foldnorm.build_info()["vector_path"]
    assert "vector path %s" % foldnorm.build_info()["vector_path"] in table
    assert machine["caches"] == caches()
    assert "Caches: %s." % caches_text(machine["caches"]) in table
    sets = results["cache_memory"]
    assert (sets["fit_bytes"], sets["beyond_bytes"]) == cache_memory.SMOKE_SIZES
    assert "sizes fixed for a smoke run" in sets["note"] and "#### Cache and memory" in table
    assert "The copy at 2 threads: " in table and sets["seconds"] > 0
    assert [(c["set"], c["kernel"]) for c in sets["cases"]] == [
        ("cache", "batch_norm"), ("cache", "layer_norm"), ("memory", "batch_norm"), ("memory", "layer_norm")]
    for case in sets["cases"]:
        assert [row["threads"] for row in case["rows"]] == [1, 2]
        for row in case["rows"]:
            assert row["x_copy"]["n"] == 2 and row["gbps"] > 0 and row["copy_gbps"] > 0
    assert [m["name"] for m in results["models"]] == ["resnet_tiny", "mobilenet_tiny"]
    for model in results["models"]:
        assert set(model["latency"]) >= {"original/disabled", "original/enabled", "ort_basic/enabled"}
        assert model["variants"]["original"]["batch_norm_nodes"] > 0
        assert model["variants"]["ort_basic"]["max_abs_diff_enabled"] < 1e-3
        if "fold" in model:  # once foldnorm.fold exists: its output has no BatchNormalization left
            assert model["variants"]["folded"]["batch_norm_nodes"] == 0
            assert model["variants"]["folded"]["max_abs_diff_disabled"] < 1e-3
            assert model["fold"]["param_bytes_after"] < model["fold"]["param_bytes_before"]
    scaling = results["fold_scaling"]
    assert [row["pairs"] for row in scaling["rows"]] == [10, 20]
    for row in scaling["rows"]:
        assert row["batch_norm_nodes"] == row["pairs"] and row["batch_norm_nodes_left"] == 0
        assert row["verify_max_rel_error"] < 1e-4
        assert row["fold"]["n"] == 2 and row["fold"]["min"] <= row["fold"]["median"] <= row["fold"]["max"]
        assert row["seconds_per_pair"] == pytest.approx(row["fold"]["median"] / row["pairs"])
        assert results["figures"]["fold_scaling/%d_pairs/seconds" % row["pairs"]]["value"] == row["fold"]["median"]
    assert scaling["rows"][0]["per_pair_vs_smallest"]["median"] == pytest.approx(1.0)
    assert scaling["target"]["met"] is None and "not in this run" in scaling["target"]["why"]
    assert "#### Fold scaling: conv_bn_chain" in table
    assert "issue" not in table.lower()
    assert "| fold of 1000 Conv+BN pairs < 2 s | not in this run (sizes: 10, 20 pairs) | not measured |" in table
    if UNDER_ASAN:
        assert results["plots"] == []
    elif importlib.util.find_spec("matplotlib") is None:
        assert any("matplotlib is not importable" in note for note in results["notes"])
    else:
        assert sorted(results["plots"]) == ["kernels_gbps.png", "model_latency.png", "thread_scaling.png"]
        for name in results["plots"]:
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_light_model_is_materialized_into_constant_weights():
    model = models.materialize_light_model("light_resnet50")
    assert not any(node.op_type == "ConstantOfShape" for node in model.graph.node)
    initializers = {t.name for t in model.graph.initializer}
    assert [i.name for i in model.graph.input] == ["gpu_0/data_0"]
    batch_norms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(batch_norms) == 53 and all(set(n.input[1:]) <= initializers for n in batch_norms)
    onnx.checker.check_model(model, full_check=True)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(weights[n.input[4]].min() > 0 for n in batch_norms)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    probabilities = session.run(None, {"gpu_0/data_0": x})[0]
    assert probabilities.shape == (1, 1000) and np.isfinite(probabilities).all()
    assert abs(float(probabilities.sum()) - 1.0) < 1e-4


@pytest.mark.parametrize("build, convs", [
    (lambda: models.resnet_like(input_size=32, widths=(8, 16), blocks=(1, 1), classes=10), 6),
    (lambda: models.mobilenet_like(input_size=32, blocks=((1, 8, 1, 1), (2, 16, 2, 2)), stem=8, head=32,
                                   classes=10), 10),
])
def test_generated_cnns_have_a_batch_norm_after_every_conv_and_run(build, convs):
    model = build()
    assert model.ir_version == models.IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == ops.count("BatchNormalization") == convs
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    logits = session.run(None, {"input": x})[0]
    assert logits.shape == (1, 10) and np.isfinite(logits).all()



@pytest.mark.parametrize("pairs", [1, 20])
def test_conv_bn_chain_has_the_pairs_asked_for_and_folds_to_no_batch_norm(pairs):
    model = models.conv_bn_chain(pairs)
    assert model.ir_version == models.IR_VERSION == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", models.CHAIN_OPSET)]
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Conv", "BatchNormalization", "Relu"] * pairs
    x = np.random.default_rng(2).standard_normal((1, 8, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"input": x})[0]
    assert y.shape == (1, 8, 8, 8) and np.isfinite(y).all() and y.max() > 0

    from foldnorm import fold_model

    folded, fold_report = fold_model(model, verify=True)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"] * pairs
    assert fold_report.counts()["folded"] == {"Conv": pairs}
    assert fold_report.verification.passed


def _scaling_row(pairs, median, left=0):
    return {"pairs": pairs, "batch_norm_nodes_left": left,
            "fold": {"median": median, "min": median, "max": median, "n": 1}}


def test_the_fold_scaling_target_is_judged_on_the_1000_pair_median():
    pairs = (250, 1000)
    met = fold_scaling.evaluate_target([_scaling_row(250, 0.5), _scaling_row(1000, 1.9)], pairs)
    assert met["met"] is True and met["measured"]["median"] == 1.9
    assert fold_scaling.evaluate_target([_scaling_row(1000, 2.1)], pairs)["met"] is False
    unfolded = fold_scaling.evaluate_target([_scaling_row(1000, 0.1, left=3)], pairs)
    assert unfolded["met"] is False and "3 BatchNormalization nodes left" in unfolded["why"]
    failed = fold_scaling.evaluate_target([_scaling_row(250, 0.5)], pairs)
    assert failed["met"] is None and "1000-pair fold failed" in failed["why"]
    assert "not in this run" in fold_scaling.evaluate_target([], (10, 20))["why"]


@pytest.mark.parametrize("selected, fold_pairs, model_names", [
    (None, (250, 1000), ["light_resnet50", "resnet_like", "mobilenet_like"]),
    ("none", (), []),
    ("conv_bn_chain", (250, 1000), []),
    ("resnet_like", (), ["resnet_like"]),
])
def test_models_option_selects_the_fold_scaling_by_name(monkeypatch, selected, fold_pairs, model_names):
    configs = []
    monkeypatch.setattr(runner, "run", lambda config, threads, out, make_plots: configs.append(config))
    assert main(["run", "--quick", "--threads", "1"] + (["--models", selected] if selected else [])) == 0
    config, = configs
    assert config.fold_pairs == fold_pairs and [c.name for c in config.model_cases] == model_names
    assert runner.config_for("full").fold_pairs == (250, 500, 1000)


@pytest.mark.parametrize("selected, cache_kernels", [
    (None, cache_memory.KERNELS), ("none", ()), ("layer_norm,rms_norm", ("layer_norm",)),
])
def test_kernels_option_selects_the_cache_and_memory_kernels_too(monkeypatch, selected, cache_kernels):
    configs = []
    monkeypatch.setattr(runner, "run", lambda config, threads, out, make_plots: configs.append(config))
    assert main(["run", "--quick", "--threads", "1"] + (["--kernels", selected] if selected else [])) == 0
    config, = configs
    assert config.cache_kernels == cache_kernels and config.cache_sizes is None


def test_a_missing_fold_pass_leaves_the_other_variants_timed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "foldnorm.fold", None)  # makes `from foldnorm.fold import ...` fail
    result = models.run_model(models.SMOKE_MODELS[0], threads=1, repeats=1, directory=str(tmp_path))
    assert "foldnorm.fold is not available yet" in result["notes"][0]
    assert set(result["variants"]) == {"original", "ort_basic"}
    assert set(result["latency"]) == {"original/disabled", "original/enabled", "ort_basic/disabled",
                                      "ort_basic/enabled"}
    assert "folded_vs_original/disabled" not in result["ratios"]


def test_a_missing_fold_pass_skips_the_fold_scaling_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "foldnorm.fold", None)
    scaling = fold_scaling.run((5,), repeats=1)
    assert "foldnorm.fold is not available yet" in scaling["skipped"] and scaling["rows"] == []
    lines = report._fold_scaling(scaling, repeats=1)
    assert lines[2] == "Skipped: " + scaling["skipped"]
    assert report.figures([], [], scaling) == {}


def test_plots_are_skipped_with_a_note_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths, note = report.plot({"kernels": [], "models": [], "machine": {"threads": [1, 2]}}, "unused")
    assert paths == [] and "matplotlib is not importable" in note


def test_the_thread_sweep_runs_from_1_to_every_core():
    from benchmarks.harness import thread_sweep

    assert thread_sweep(1) == [1] and thread_sweep(2) == [1, 2]
    assert thread_sweep(8) == list(range(1, 9))
    assert thread_sweep(96) == list(range(1, 9)) + [16, 32, 64, 96]


def test_parallel_efficiency_is_the_kernels_speed_up_over_the_copys_per_round():
    from benchmarks.harness import paired_efficiency

    kernel_1, kernel_4 = Samples({0: 4.0, 1: 4.0, 2: 8.0}), Samples({0: 2.0, 1: 1.0, 2: 2.0})
    copy_1, copy_4 = Samples({0: 2.0, 1: 2.0, 2: 2.0}), Samples({0: 1.0, 1: 1.0})
    # Round 0: the kernel gains 2x, the copy 2x -> 1.0; round 1: 4x against 2x -> 2.0; round 2: no copy.
    assert paired_efficiency(kernel_1, kernel_4, copy_1, copy_4) == {"median": 1.5, "min": 1.0, "max": 2.0, "n": 2}
    assert paired_efficiency(kernel_1, kernel_4, copy_1, Samples({7: 1.0})) is None


def test_the_plots_and_the_table_name_no_internal_tracking_numbers():
    import inspect

    for module in (report, fold_scaling, kernels, models, runner):
        assert "issue" not in inspect.getsource(module).lower(), module.__name__


@pytest.mark.parametrize("kernel", ["batch_norm", "batch_norm_train", "batch_norm_backward"])
@pytest.mark.parametrize("shape, channels_last", [((64, 8), False), ((4, 8, 5), False), ((2, 8, 3, 5), True)])
def test_batch_norm_benches_of_any_rank_match_their_float64_reference(kernel, shape, channels_last):
    bench = kernels.BENCHES[kernel](kernels.KernelCase(kernel, shape, channels_last=channels_last),
                                    np.random.default_rng(1))
    output = bench.foldnorm(1)()
    primary = output[0] if isinstance(output, tuple) else output
    assert primary.shape == bench.x.shape
    np.testing.assert_allclose(primary, bench.reference(), rtol=1e-4, atol=1e-4)
