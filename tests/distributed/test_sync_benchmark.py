"""benchmarks/distributed.py: its cost model, and a tiny launch on 1 and 2 ranks whose report has the
bytes each rank exchanges."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import distributed as bench
from test_sync_batch_norm import LAUNCH_TIMEOUT_S, _mpiexec

SCRIPT = Path(bench.__file__)


def test_exchange_model_and_the_fit_that_reproduces_a_measurement():
    # 2 passes of 2 Allgathers each, log2(8) = 3 rounds; 7 ranks' 2 x 2C + 9 = 265 values received.
    assert bench.values_per_step(64) == 265
    assert bench.exchange_model(8, 64, 1e-6, 1e9) == pytest.approx(2 * 2 * 3 * 1e-6 + 7 * 8 * 265 / 1e9)
    latency, bandwidth = bench.fit_latency_bandwidth({"1": 20.0, "1001": 100.0}, 2)
    assert latency == pytest.approx(20e-6)  # 20 us = 1 collective x 1 round
    assert bandwidth == pytest.approx(8 * 1000 / 80e-6)


def test_tiny_launch_reports_the_bytes_per_step(tmp_path):
    if _mpiexec() is None:
        pytest.skip("mpi4py and mpiexec are not installed (pip install 'foldnorm[mpi]')")
    out = tmp_path / "results.json"
    command = [sys.executable, str(SCRIPT), "--shape", "2,5,3,3", "--ranks", "1,2", "--repeat", "2",
               "--allgather-repeat", "3", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert [r["ranks"] for r in results] == [1, 2]
    for r in results:
        assert r["float64_values_sent"] == 4 * 5 + 9
        assert r["sent_bytes"] == 8 * r["float64_values_sent"]
        assert r["received_bytes"] == (r["ranks"] - 1) * r["sent_bytes"]
        assert all(np.isfinite(v) and v > 0 for v in r["parts_ms"].values())
    assert "| bytes sent per rank per step |" in proc.stdout and "P = 4096" in proc.stdout
