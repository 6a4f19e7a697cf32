"""The under-load benchmark's logic and tiny runs of it (no spinners, a fraction of a second per worker).
No latency is asserted: the figures mean something only on a machine set up for them."""
import json

import pytest

import foldnorm
from benchmarks import under_load
from benchmarks.__main__ import main
from benchmarks.machine import caches

TINY = ["under-load", "--smoke", "--spinners", "0", "--seconds", "0.02", "--min-calls", "3", "--rounds", "1"]


def test_percentile_interpolates_between_ranks():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert under_load.percentile(values, 0) == 1.0
    assert under_load.percentile(values, 50) == 3.0
    assert under_load.percentile(values, 100) == 5.0
    assert under_load.percentile(values, 90) == pytest.approx(4.6)
    assert under_load.percentile([7.0], 99) == 7.0


def test_summary_is_in_milliseconds():
    summary = under_load.summarize([0.001, 0.002, 0.003])
    assert summary == {"p50_ms": pytest.approx(2.0), "p99_ms": pytest.approx(2.98), "mean_ms": pytest.approx(2.0),
                       "calls": 3}


def test_rounds_rotate_the_order_of_the_settings():
    assert list(under_load.rotations("abc", 4)) == [list("abc"), list("bca"), list("cab"), list("abc")]


def _figures(mean, p99):
    return {"mean_ms": mean, "p99_ms": p99}


def test_the_default_may_be_25_percent_or_50_us_slower_than_one_thread_in_mean_and_p99():
    single = _figures(1.0, 10.0)
    met = under_load.verdict({"default": _figures(1.25, 12.5), "one_thread": single})
    assert met["met"] and met["mean"] == {"ratio": 1.25, "excess_ms": pytest.approx(0.25), "met": True,
                                          "round_ratios": []}
    assert not under_load.verdict({"default": _figures(1.3, 5.0), "one_thread": single})["met"]
    late = under_load.verdict({"default": _figures(0.5, 12.6), "one_thread": single})
    assert late["mean"]["met"] and not late["p99"]["met"] and not late["met"]
    # A fast call: twice as slow is within the 0.05 ms slack, 0.06 ms more is not.
    fast = _figures(0.02, 0.05)
    assert under_load.verdict({"default": _figures(0.04, 0.1), "one_thread": fast})["met"]
    assert not under_load.verdict({"default": _figures(0.08, 0.1), "one_thread": fast})["met"]
    assert under_load.verdict({"default": _figures(1.0, 1.0), "one_thread": {"error": "crashed"}}) is None


def test_each_rounds_ratio_is_kept_beside_the_pooled_one():
    ours = dict(_figures(3.0, 30.0), rounds=[_figures(1.0, 10.0), _figures(5.0, 50.0)])
    single = dict(_figures(2.0, 20.0), rounds=[_figures(2.0, 20.0), _figures(2.0, 20.0)])
    result = under_load.verdict({"default": ours, "one_thread": single})
    assert result["mean"]["ratio"] == 1.5 and result["mean"]["round_ratios"] == [0.5, 2.5]
    assert result["p99"]["round_ratios"] == [0.5, 2.5] and not result["met"]


def test_the_throughput_verdict_needs_90_percent_of_one_thread_per_process():
    single = {"calls_per_second": 1000.0}
    assert under_load.throughput_verdict({"default": {"calls_per_second": 900.0}, "one_thread": single}) == {
        "ratio": 0.9, "met": True}
    assert not under_load.throughput_verdict({"default": {"calls_per_second": 899.0}, "one_thread": single})["met"]
    assert under_load.throughput_verdict({"default": {"error": "x"}, "one_thread": single}) is None


def test_settings_are_named_and_checked():
    assert [s.name for s in under_load.parse_settings("one_thread, torch")] == ["one_thread", "torch"]
    with pytest.raises(Exception, match="expected settings among default, one_thread"):
        under_load.parse_settings("default,fastest")


def test_the_calls_are_the_ones_the_targets_name():
    labels = [under_load.call_label(c) for c in under_load.CALLS]
    assert labels == ["batch_norm (32, 64, 28, 28)", "batch_norm_train (256, 64)", "batch_norm_train (32, 512, 7, 7)",
                      "batch_norm_train (64, 128, 14, 14)", "batch_norm_backward (64, 128, 14, 14)",
                      "layer_norm (8192, 768)", "rms_norm (64, 768)", "group_norm (16, 256, 32, 32), 32 groups"]


@pytest.mark.parametrize("extra, words", [
    (["--spinners", "-1"], "--spinners must be >= 0"),
    (["--min-calls", "0"], "--rounds and --min-calls must be >= 1"),
    (["--throughput-seconds", "-1"], "--throughput-seconds >= 0"),
    (["--settings", "default,base"], "the base settings need --base-root"),
    (["--base-root", "/nonexistent"], "--base-root must be a foldnorm checkout"),
])
def test_bad_arguments_are_one_line_and_exit_code_2(extra, words, capsys):
    assert main(TINY + extra) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_spinners_run_until_stopped():
    spinners = under_load.start_spinners(2)
    assert all(s.poll() is None for s in spinners)
    under_load.stop_spinners(spinners)
    assert all(s.returncode is not None for s in spinners)


def test_a_tiny_quiet_run_times_every_call_and_both_checks(tmp_path, capsys):
    out = tmp_path / "under_load.json"
    assert main(TINY + ["--settings", "default,one_thread,no_spin", "--throughput-seconds", "0.1",
                        "--out", str(out)]) == 0
    table = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["spinners"] == 0 and figures["rounds"] == 1
    assert figures["build"]["vector_path"] == foldnorm.build_info()["vector_path"]
    assert figures["caches"] == caches()
    assert [r["call"]["label"] for r in figures["results"]] == [under_load.call_label(c) for c in under_load.SMOKE_CALLS]
    for result in figures["results"]:
        summary = result["summary"]
        assert set(summary) == {"default", "one_thread", "no_spin"}
        assert summary["default"]["threads"] == summary["no_spin"]["threads"] == foldnorm.get_num_threads()
        assert summary["one_thread"]["threads"] == 1
        for figures_of_one in summary.values():
            assert figures_of_one["calls"] >= 3 and 0 < figures_of_one["p50_ms"] <= figures_of_one["p99_ms"]
            assert [r["calls"] for r in figures_of_one["rounds"]] == [figures_of_one["calls"]]
            assert set(figures_of_one["pool"]) >= {"team_regions", "caller_units", "worker_units"}
        assert set(result["verdict"]) == {"mean", "p99", "met"} and len(result["verdict"]["p99"]["round_ratios"]) == 1
        assert "| %s | " % result["call"]["label"] in table
    throughput = figures["throughput"]
    assert throughput["call"]["label"] == under_load.call_label(under_load.SMOKE_THROUGHPUT_CALL)
    for name in ("default", "one_thread", "no_spin"):
        assert throughput["settings"][name]["calls_per_second"] > 0
    assert throughput["verdict"]["ratio"] == pytest.approx(
        throughput["settings"]["default"]["calls_per_second"] / throughput["settings"]["one_thread"]["calls_per_second"])
    assert "| call | default | num_threads=1 | workers never spin |" in table
    assert "Default / num_threads=1:" in table


def test_a_base_checkout_is_timed_from_its_own_folder_and_a_broken_one_is_a_note(tmp_path, capsys):
    broken = tmp_path / "broken"
    (broken / "foldnorm").mkdir(parents=True)
    (broken / "foldnorm" / "__init__.py").write_text("")
    assert main(TINY + ["--settings", "base", "--base-root", str(broken), "--throughput-seconds", "0"]) == 0
    table = capsys.readouterr().out
    assert "foldnorm.batch_norm_train is not available in this build" in table
    assert "| batch_norm_train (8, 4) | n/a |" in table and "Two processes" not in table

    out = tmp_path / "base.json"
    assert main(TINY + ["--settings", "base_passive", "--base-root", under_load.ROOT, "--throughput-seconds", "0",
                        "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["base_root"] == under_load.ROOT and figures["throughput"] is None
    for result in figures["results"]:
        assert result["summary"]["base_passive"]["calls"] >= 3
        assert result["verdict"] is None  # neither the default nor one thread was timed
