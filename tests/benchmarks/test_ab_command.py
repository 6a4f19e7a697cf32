"""`python -m benchmarks ab`: what it writes, its exit codes, and the slowdown hook reaching one side only."""
import json
import os

import pytest

from benchmarks import ab, harness, machine
from benchmarks.__main__ import main


def test_a_same_code_smoke_comparison_writes_its_summary_and_exits_0(tmp_path, capsys):
    code = main(["ab", "--base-root", ab.REPO, "--smoke", "--no-counts", "--out", str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((tmp_path / "ab.json").read_text())
    assert (tmp_path / "ab.md").read_text().strip() == out.strip()
    assert results["exit_code"] == 0 and results["rounds"] == 3 and not results["verdict"]["flagged"]
    assert set(results["machine_check"]) == {"busy", "reasons", "numbers"}
    assert set(results["machine_check"]["numbers"]) == {"start", "run"}
    assert results["machine"]["topology"]["logical_cpus"] >= 1
    assert results["machine"]["caches"] == machine.caches()
    names = {row["name"] for row in results["timings"]}
    assert "kernel/batch_norm/2x64x4x4/t1" in names and "fold/conv_bn_chain_10" in names
    assert all(len(samples) == 3 for samples in results["samples"]["head"].values())
    assert results["counts"] == {"skipped": "turned off (--no-counts)"}
    # 3 rounds cannot make anything significant over these figures, and the summary says so.
    assert any("too few for any interval to exclude 1" in note for note in results["notes"])
    assert out.startswith("### foldnorm A/B: working tree at ")
    if results["machine_check"]["busy"]:
        assert "**BUSY MACHINE: the timings of this run are unreliable.**" in out


def test_a_base_that_is_not_a_commit_is_refused_with_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["ab", "--base", "no-such-ref-anywhere", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks ab: base 'no-such-ref-anywhere' is not a commit") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "ab.json")


@pytest.mark.parametrize("argv", [["ab"], ["ab", "--base", "HEAD", "--rounds", "0"],
                                  ["ab", "--base", "HEAD", "--threshold", "1.5"]])
def test_bad_options_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_slowdown_hook_reaches_the_heads_workers_only(monkeypatch):
    monkeypatch.setenv(harness.TWICE_ENV, "batch_norm")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    base, head = ab.side_environments()
    assert head[harness.TWICE_ENV] == "batch_norm" and harness.TWICE_ENV not in base
    assert "PYTHONPATH" not in base and "PYTHONPATH" not in head


def test_the_slowdown_hook_calls_the_kernel_twice_and_leaves_the_others_alone(monkeypatch):
    import foldnorm

    calls = []
    monkeypatch.setattr(foldnorm, "layer_norm", lambda *a, **k: calls.append("layer_norm") or len(calls))
    monkeypatch.setattr(foldnorm, "rms_norm", lambda *a, **k: calls.append("rms_norm") or len(calls))
    monkeypatch.setenv(harness.TWICE_ENV, "layer_norm")
    assert harness.foldnorm_function("layer_norm")() == 2 and calls == ["layer_norm"] * 2
    assert harness.foldnorm_function("rms_norm")() == 3 and calls[-1] == "rms_norm"
    monkeypatch.setenv(harness.TWICE_ENV, "all")
    harness.foldnorm_function("rms_norm")()
    assert calls[-2:] == ["rms_norm"] * 2
    with pytest.raises(harness.Unavailable, match="foldnorm.no_such_kernel is not available"):
        harness.foldnorm_function("no_such_kernel")


@pytest.mark.parametrize("name, words", [
    ("kernel/batch_norm_NHWC/32x256x28x28/t2", "batch_norm NHWC 32x256x28x28, 2 threads"),
    ("kernel/group_norm/16x256x32x32_g32/t1", "group_norm 16x256x32x32 g32, 1 thread"),
    ("copy/layer_norm/8192x768/t1", "copy beside layer_norm 8192x768, 1 thread"),
    ("fold/conv_bn_chain_250", "fold of a 250-pair Conv+BN chain"),
])
def test_figures_are_named_in_words_in_the_summary(name, words):
    from benchmarks.ab_report import figure_label

    assert figure_label(name) == words


def test_each_worker_gets_a_fresh_copy_of_its_sides_package(tmp_path):
    package = tmp_path / "tree" / "foldnorm"
    (package / "kernels" / "__pycache__").mkdir(parents=True)
    for name in ("__init__.py", "kernels/__init__.py", "kernels/_runtime.cpython-311-x86_64-linux-gnu.so",
                 "kernels/_runtime.c", "kernels/_runtime.pyx", "kernels/__pycache__/x.pyc"):
        (package / name).write_text(name)
    copy = ab.fresh_copy(str(tmp_path / "tree"), str(tmp_path / "round-0" / "base"))
    copied = sorted(str(p.relative_to(copy)) for p in (tmp_path / "round-0" / "base").rglob("*") if p.is_file())
    assert copied == ["foldnorm/__init__.py", "foldnorm/kernels/__init__.py",
                      "foldnorm/kernels/_runtime.cpython-311-x86_64-linux-gnu.so"]
