"""The deterministic signal: callgrind's output read right, and, under valgrind, counts that two processes
agree on and that move when a kernel makes an extra pass over memory."""
import json

import pytest

from benchmarks import counts
from benchmarks.__main__ import main

DUMP = """version: 1
creator: callgrind-3.19.0
desc: LL cache: 4194304 B, 64 B, 16-way associative
events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
summary: 2000 600 400 3 50 40 2 30 20
totals: 2000 600 400 3 50 40 2 30 20
"""


def test_a_callgrind_region_becomes_instructions_and_last_level_bytes_per_element():
    events = counts.parse_dump(DUMP)
    assert events["Ir"] == 2000 and events["DLmr"] == 30 and events["DLmw"] == 20
    assert counts.per_element(events, elements=100) == {"instructions": 20.0, "ll_bytes": (2 + 30 + 20) * 64 / 100}
    with pytest.raises(ValueError, match="not a callgrind output file"):
        counts.parse_dump("events: Ir\n")


def test_counts_are_flagged_only_above_their_threshold():
    base = {"a": {"instructions": 1.0, "ll_bytes": 8.0}, "b": {"instructions": 2.0, "ll_bytes": 8.0},
            "gone": {"instructions": 1.0, "ll_bytes": 1.0}}
    head = {"a": {"instructions": 1.02, "ll_bytes": 8.0}, "b": {"instructions": 1.5, "ll_bytes": 12.0}}
    rows = {row["key"]: row for row in counts.compare(base, head, threshold=0.03)}
    assert set(rows) == {"a", "b"}
    assert not rows["a"]["flagged"] and rows["a"]["instructions"]["ratio"] == pytest.approx(1.02)
    assert rows["b"]["flagged"] and rows["b"]["ll_bytes"]["flagged"] and not rows["b"]["instructions"]["flagged"]


def test_every_count_case_moves_more_than_the_simulated_last_level_cache():
    for case in counts.COUNT_CASES + counts.SMOKE_COUNT_CASES:
        assert case.elements * 4 >= 2 * 4 * 2**20, case.key


@pytest.mark.skipif(counts.valgrind() is None, reason="valgrind is not installed (Debian: apt-get install valgrind)")
def test_counts_agree_between_processes_and_catch_a_kernel_that_does_its_work_twice(tmp_path, monkeypatch, capsys):
    # The working tree against itself, its layer_norm made to run twice per call on the head's side only.
    monkeypatch.setenv("FOLDNORM_BENCH_TWICE", "layer_norm")
    code = main(["ab", "--base-root", counts.REPO, "--smoke", "--rounds", "2", "--kernels", "batch_norm,layer_norm",
                 "--out", str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "ab.json").read_text())
    rows = {row["key"]: row for row in results["counts"]["rows"]}
    assert set(rows) == {c.key for c in counts.SMOKE_COUNT_CASES}
    batch_norm, layer_norm = rows["batch_norm/8x64x64x64"], rows["layer_norm/2048x1024"]
    # Two processes, the same kernel: the same counts, but for a few instructions of the loops' peeling
    # around small parameter arrays, which the heap places a little differently in each process.
    # (Measured: within 0.05% in a same-code comparison, 0.15% with another kernel made to run twice.)
    assert batch_norm["instructions"]["ratio"] == pytest.approx(1.0, abs=5e-3)
    assert batch_norm["ll_bytes"]["ratio"] == pytest.approx(1.0, abs=5e-3)
    assert not batch_norm["flagged"]
    # One more pass over x and y: twice the instructions and twice the last-level traffic.
    assert layer_norm["instructions"]["ratio"] == pytest.approx(2.0, rel=0.02)
    assert layer_norm["ll_bytes"]["ratio"] == pytest.approx(2.0, rel=0.05)
    assert layer_norm["ll_bytes"]["base"] == pytest.approx(8.0, rel=0.05)  # read x, write y: 2 x 4 bytes
    assert layer_norm["flagged"] and code == 1
    assert results["verdict"]["counts_flagged"] == ["layer_norm/2048x1024"]
    assert "**SLOWDOWN FLAGGED** (deterministic counts: layer_norm 2048x1024)." in out
    assert "FOLDNORM_BENCH_TWICE=layer_norm" in out


def test_the_counts_of_one_build_are_tabled_per_kernel_case():
    first, second = counts.SMOKE_COUNT_CASES
    text = counts.markdown({first.key: {"instructions": 0.8603, "ll_bytes": 8.1331}}, {second.key: "not in this build"},
                           counts.SMOKE_COUNT_CASES)
    assert text.splitlines()[2:] == ["| batch_norm | 8x64x64x64 | 0.860 | 8.13 |",
                                     "| layer_norm | 2048x1024 | skipped: not in this build | |"]
