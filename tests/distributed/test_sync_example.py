"""The data-parallel training example: 2 and 3 ranks with synchronized batch norm follow the loss curve of
one process training on the whole batch with foldnorm's single-process kernels."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_sync_batch_norm import LAUNCH_TIMEOUT_S, _mpiexec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sync_batch_norm_training.py"
ARGS = ["--steps", "60", "--batch", "100"]  # 100 samples: 34, 33 and 33 on three ranks
# One kernel thread per process: the tiny batches gain nothing from more, and ranks share the cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_example(launcher, extra, out):
    proc = subprocess.run(launcher + [str(EXAMPLE)] + ARGS + extra + ["--out", str(out)], capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def mpiexec():
    path = _mpiexec()
    if path is None:
        pytest.skip("mpi4py and mpiexec are not installed (pip install 'foldnorm[mpi]')")
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run_example([sys.executable], ["--single"], tmp_path_factory.mktemp("example") / "single.json")


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_follow_one_process_on_the_whole_batch(ranks, mpiexec, one_process, tmp_path):
    synced = run_example([mpiexec, "-n", str(ranks), sys.executable], [], tmp_path / "synced.json")
    assert synced["ranks"] == ranks and one_process["ranks"] == 1
    losses, expected = np.array(synced["losses"]), np.array(one_process["losses"])
    assert len(losses) == len(expected) == 60
    np.testing.assert_allclose(losses, expected, rtol=1e-12)
    assert synced["accuracy"] == one_process["accuracy"]
    # And it learns: the loss of the last ten steps is well below the first ten's.
    assert losses[-10:].mean() < 0.6 * losses[:10].mean()
