"""sync_batch_norm_train / sync_batch_norm_backward in real processes (mpiexec -n 1, 2, 3; torch.distributed
gloo with 2) and in threads with a simulated communicator: each rank's shard of the outputs against
foldnorm's single-process kernels and a float64 NumPy reference on the whole batch, the statistics the
same bits on every rank, and a bad argument on one rank raising on every rank."""
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

import foldnorm
from foldnorm import distributed
from sync_cases import CASES, EPS, MOMENTUM, reference

WORKER = Path(__file__).with_name("mpi_worker.py")
WORLDS = [1, 2, 3]
LAUNCH_TIMEOUT_S = 120


def _mpiexec():
    """The mpiexec beside this Python (the mpich wheel's), else one on PATH; None without mpi4py."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _load(out_dir, world):
    ranks = []
    for rank in range(world):
        with np.load(os.path.join(out_dir, "rank%d.npz" % rank)) as saved:
            ranks.append({key: saved[key] for key in saved.files})
    return ranks


def _check_launch(proc_results):
    for rc, output in proc_results:
        assert rc == 0, output[-4000:]


@functools.lru_cache(maxsize=None)
def mpi_run(world):
    """Every rank's saved results of one `mpiexec -n world` launch of the worker (one launch per world)."""
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpi4py and mpiexec are not installed (pip install 'foldnorm[mpi]')")
    out_dir = tempfile.mkdtemp(prefix="foldnorm-mpi-")
    proc = subprocess.run([mpiexec, "-n", str(world), sys.executable, str(WORKER), "mpi", out_dir],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=WORKER.parent)
    _check_launch([(proc.returncode, proc.stdout + proc.stderr)])
    results = _load(out_dir, world)
    shutil.rmtree(out_dir)
    return results


@functools.lru_cache(maxsize=None)
def gloo_run(world):
    """The same worker over torch.distributed's gloo backend, one process per rank."""
    pytest.importorskip("torch.distributed", reason="torch is not installed")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch has no gloo backend")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir = tempfile.mkdtemp(prefix="foldnorm-gloo-")
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "gloo", out_dir], env=env,
                                      cwd=WORKER.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outcomes = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outcomes.append((proc.returncode, output))
    _check_launch(outcomes)
    results = _load(out_dir, world)
    shutil.rmtree(out_dir)
    return results


def ulps(dtype):
    return float(np.finfo(dtype).eps)


def assert_close_scaled(actual, expected, rel, what):
    """|actual - expected| <= rel * max(1, max |expected|): errors measured on the result's scale."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= rel * scale, "%s: max error %g > %g (scale %g)" % (what, err, rel * scale, scale)


def assert_same_bits_on_every_rank(ranks, key):
    first = ranks[0][key]
    for rank, saved in enumerate(ranks[1:], start=1):
        assert saved[key].dtype == first.dtype and saved[key].tobytes() == first.tobytes(), \
            "%s differs between rank 0 and rank %d" % (key, rank)


def check_case(ranks, case, world, prefix=None):
    """Every rank's results of one case against single-process runs on the whole batch."""
    prefix = prefix or case.name
    dtype = np.dtype(case.dtype)
    axis = case.channel_axis
    x, dy, weight, bias, running_mean, running_var = case.data(world)
    get = lambda field: [saved["%s/%s" % (prefix, field)] for saved in ranks]  # noqa: E731

    # The statistics, running statistics and whole-batch weight gradients: the same bits everywhere.
    for field in ("mean", "invstd", "running_mean", "running_var", "dweight_all", "dbias_all"):
        assert_same_bits_on_every_rank(ranks, "%s/%s" % (prefix, field))
    # Each shard's y and dx come back in x's dtype and shard shape.
    for saved_y, saved_dx, shard in zip(get("y"), get("dx"), case.split(x, world)):
        assert saved_y.dtype == dtype and saved_y.shape == shard.shape
        assert saved_dx.dtype == dtype and saved_dx.shape == shard.shape
    y, dx = np.concatenate(get("y")), np.concatenate(get("dx"))
    mean, invstd = get("mean")[0], get("invstd")[0]
    assert mean.dtype == np.float64 and invstd.dtype == np.float64

    # The float64 NumPy reference. The statistics are exact float64 sums of the values as given, in
    # float32 as in float64.
    ref_y, ref_mean, ref_invstd, ref_unbiased, ref_dx, ref_dweight, ref_dbias = reference(x, dy, weight, bias, axis)
    # float64 statistics for every dtype: float64 data's to 1e-12, float32 data's (summed in float32 lanes
    # as the kernels sum them) to a few float32 ulps.
    tol = 1e-12 if dtype == np.float64 else 4 * ulps(dtype)
    assert_close_scaled(mean, ref_mean, tol, "mean")
    assert_close_scaled(invstd, ref_invstd, tol, "invstd")
    assert_close_scaled(get("running_mean")[0], (1 - MOMENTUM) * running_mean + MOMENTUM * ref_mean, tol,
                        "running_mean")
    assert_close_scaled(get("running_var")[0], (1 - MOMENTUM) * running_var + MOMENTUM * ref_unbiased, tol,
                        "running_var")
    assert_close_scaled(y, ref_y, tol, "y against float64")
    assert_close_scaled(dx, ref_dx, tol, "dx against float64")
    assert_close_scaled(get("dweight_all")[0], ref_dweight, tol, "dweight (all ranks)")
    assert_close_scaled(get("dbias_all")[0], ref_dbias, tol, "dbias (all ranks)")
    # This shard's dweight / dbias in x's dtype: they add up to the whole batch's.
    assert_close_scaled(np.sum(get("dweight"), axis=0, dtype=np.float64), ref_dweight, tol * world, "sum of dweight")
    assert_close_scaled(np.sum(get("dbias"), axis=0, dtype=np.float64), ref_dbias, tol * world, "sum of dbias")

    # foldnorm's single-process kernels on the whole batch.
    kernel_running_mean, kernel_running_var = running_mean.copy(), running_var.copy()
    k_y, k_mean, k_invstd = foldnorm.batch_norm_train(x, weight, bias, running_mean=kernel_running_mean,
                                                      running_var=kernel_running_var, momentum=MOMENTUM,
                                                      eps=EPS, channel_axis=axis)
    # The backward kernel is given the exact statistics: batch_norm_train returns float32 ones for
    # float32 x, whose rounding (3e-5 at mean 1e3) would show in its dx, not in ours.
    k_dx, k_dweight, k_dbias = foldnorm.batch_norm_backward(dy, x, ref_mean, ref_invstd, weight, channel_axis=axis)
    # float32: the kernels return their statistics rounded to float32, within an ulp of ours.
    stats_tol = 1e-12 if dtype == np.float64 else 2 * ulps(dtype)
    assert_close_scaled(y, k_y, tol, "y against batch_norm_train")
    assert_close_scaled(mean, k_mean, stats_tol, "mean against batch_norm_train")
    assert_close_scaled(invstd, k_invstd, stats_tol, "invstd against batch_norm_train")
    assert_close_scaled(get("running_mean")[0], kernel_running_mean, stats_tol, "running_mean against the kernel")
    assert_close_scaled(get("running_var")[0], kernel_running_var, stats_tol, "running_var against the kernel")
    assert_close_scaled(dx, k_dx, tol, "dx against batch_norm_backward")
    assert_close_scaled(get("dweight_all")[0], k_dweight, tol, "dweight against batch_norm_backward")
    assert_close_scaled(get("dbias_all")[0], k_dbias, tol, "dbias against batch_norm_backward")


ERROR_CASES = {
    # name: (exception type every rank raises, what the other ranks' message says, ranks whose own
    # argument was wrong (they raise their own message), worlds the case runs in)
    "weight_shape_on_last_rank": ("ValueError", "weight must have shape (4,), got (3,)", "last", WORLDS),
    "int_x_on_rank_0": ("TypeError", "x must be a float16, float32 or float64 array, got dtype int64", "first",
                        WORLDS),
    "channel_axis_on_last_rank": ("ValueError", "channel_axis must be 1 (channels first) or -1", "last", WORLDS),
    "backward_dy_shape_on_last_rank": ("ValueError", "dy must have shape (3, 4, 5), got (3, 4)", "last",
                                       WORLDS),
    "eps_string_on_rank_0": ("TypeError", "eps must be a finite non-negative real number, got '1e-5'", "first",
                             WORLDS),
    "too_few_values": ("ValueError", "expected more than 1 value per channel when training, got 1", None,
                       WORLDS),
    "channels_disagree": ("ValueError", "ranks disagree on the number of channels: 4 on rank 0", None, [2, 3]),
    "eps_disagree": ("ValueError", "ranks disagree on eps: 0.001 on rank 0, 1e-05 on rank 1", None, [2, 3]),
}


def check_error_case(ranks, name):
    kind, message, culprit, _ = ERROR_CASES[name]
    world = len(ranks)
    bad = {"last": world - 1, "first": 0, None: None}[culprit]
    for rank, saved in enumerate(ranks):
        assert str(saved[name + "/error_type"]) == kind, "rank %d raised %s" % (rank, saved[name + "/error_type"])
        text = str(saved[name + "/error_message"])
        assert message in text, "rank %d: %s" % (rank, text)
        if bad is not None and rank != bad:
            assert text.startswith("on rank %d of %d: " % (bad, world)), text


ERROR_PARAMS = [(world, name) for name, (_, _, _, worlds) in ERROR_CASES.items() for world in worlds]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_mpi_matches_one_process_on_the_whole_batch(world, case):
    check_case(mpi_run(world), case, world)


@pytest.mark.parametrize("world, name", ERROR_PARAMS, ids=["%d-%s" % p for p in ERROR_PARAMS])
def test_mpi_bad_argument_on_one_rank_raises_on_every_rank(world, name):
    check_error_case(mpi_run(world), name)


@pytest.mark.parametrize("world", [2, 3])
def test_mpi_eps_of_zero_and_minus_zero_agree(world):
    assert [str(saved["eps_signed_zeros/error_type"]) for saved in mpi_run(world)] == ["none"] * world


@pytest.mark.parametrize("world", WORLDS)
def test_mpi_collectives_stay_paired_after_refusals(world):
    check_case(mpi_run(world), CASES[0], world, prefix="after_errors")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_gloo_matches_one_process_on_the_whole_batch(case):
    check_case(gloo_run(2), case, 2)


@pytest.mark.parametrize("name", [name for name, spec in ERROR_CASES.items() if 2 in spec[3]])
def test_gloo_bad_argument_on_one_rank_raises_on_every_rank(name):
    check_error_case(gloo_run(2), name)
