"""The fused-kernel benchmarks: every contender runs, the table has a row per case, and a build without the
fused kernels is skipped with a note."""
import argparse

import numpy as np
import pytest

from benchmarks import fused
from benchmarks.harness import Unavailable
from benchmarks.kernels import KernelCase


def test_smoke_run_prints_a_row_per_case(capsys):
    args = argparse.Namespace(smoke=True, quick=False, threads=1, rounds=None, no_compile=True, counts=False)
    assert fused.main(args) == 0
    table = capsys.readouterr().out
    for case in fused.SMOKE_FUSED_CASES:
        assert "| %s | %s |" % (case.label, case.shape_label) in table


@pytest.mark.parametrize("kernel", sorted({c.kernel for c in fused.FUSED_CASES + fused.FUSED_COUNT_CASES}))
def test_the_fused_call_and_the_unfused_composition_compute_the_same(kernel):
    """So that the two time the same work: y (forward) or dx (backward) agree."""
    shape = (6, 40) if kernel.startswith("add") else (2, 8, 6, 6)
    bench = fused.FusedBench(KernelCase(kernel, shape, groups=4 if kernel.startswith("group") else 0),
                             np.random.default_rng(0))
    composed = np.array(bench.unfused(1)(), copy=True)
    result = bench.fused(1)()
    np.testing.assert_allclose(result[0] if isinstance(result, tuple) else result, composed, rtol=1e-4, atol=1e-4)


def test_a_build_without_the_fused_kernels_is_skipped_with_a_note(monkeypatch):
    import foldnorm

    monkeypatch.setattr(foldnorm, "batch_norm_train", lambda x, weight=None, bias=None: None)
    bench = fused.FusedBench(KernelCase("batch_norm_train+relu", (2, 4, 3)), np.random.default_rng(0))
    with pytest.raises(Unavailable, match="no fused batch_norm_train"):
        bench.fused(1)
    assert foldnorm.add_rms_norm  # loaded, then taken away as from a build that predates it
    monkeypatch.delattr(foldnorm, "add_rms_norm")
    monkeypatch.delitem(foldnorm._HOME, "add_rms_norm")
    bench = fused.FusedBench(KernelCase("add_rms_norm", (4, 8)), np.random.default_rng(0))
    with pytest.raises(Unavailable):
        bench.fused(1)
