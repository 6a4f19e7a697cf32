"""The under-load benchmark's logic and a tiny run of it (no spinners, a fraction of a second per worker).
No latency is asserted: the figures mean something only on a machine set up for them."""
import pytest

from benchmarks import under_load
from benchmarks.__main__ import main


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


def test_verdict_needs_both_mean_and_p99_within_the_target():
    torch = {"mean_ms": 1.0, "p99_ms": 10.0}
    assert under_load.verdict({"foldnorm": {"mean_ms": 2.0, "p99_ms": 5.0}, "torch": torch}) == {
        "mean": 2.0, "p99": 0.5, "met": True}
    assert not under_load.verdict({"foldnorm": {"mean_ms": 0.5, "p99_ms": 21.0}, "torch": torch})["met"]
    assert not under_load.verdict({"foldnorm": {"mean_ms": 2.5, "p99_ms": 1.0}, "torch": torch})["met"]
    assert under_load.verdict({"foldnorm": {"mean_ms": 1.0, "p99_ms": 1.0}, "torch": {"error": "absent"}}) is None


def test_shapes_are_parsed_and_checked():
    assert under_load.parse_shapes("256x64,2x3x4") == ((256, 64), (2, 3, 4))
    for bad in ("256", "0x4", "axb", ""):
        with pytest.raises(Exception, match="expected shapes"):
            under_load.parse_shapes(bad)


def test_a_tiny_run_reports_both_contenders(tmp_path, capsys):
    out = tmp_path / "under_load.json"
    assert main(["under-load", "--spinners", "0", "--seconds", "0.05", "--rounds", "1", "--shapes", "8x4",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| (8, 4) | foldnorm |" in table
    import json

    result = json.loads(out.read_text())["results"][0]
    assert result["shape"] == [8, 4]
    ours = result["summary"]["foldnorm"]
    assert ours["calls"] >= 1 and 0 < ours["p50_ms"] <= ours["p99_ms"]
    theirs = result["summary"]["torch"]
    assert ("error" in theirs) == (result["verdict"] is None)
