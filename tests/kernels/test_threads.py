"""How many threads a call runs, and how idle ones wait.

Results are bit-identical for any thread count, including counts the caps would never pick on this
machine (the caps are lifted here through runtime's module attributes); a call too small to pay for a
team opens no parallel region; idle threads follow the OpenMP runtime's wait policy (spinning briefly by
default, never for good), and foldnorm leaves the environment as it was.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import foldnorm
from foldnorm.kernels import runtime
from tests.kernels.kernel_refs import assert_bit_identical_across_threads


@pytest.fixture
def caps_lifted(monkeypatch):
    """Every requested count reaches the C kernels: one element per thread, eight usable cores."""
    monkeypatch.setattr(runtime, "PARALLEL_GRAIN", 1)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)


def _families(dtype):
    """(name, run(num_threads) -> tuple of arrays) for every public kernel on seeded data."""
    rng = np.random.default_rng(11)
    x = (3.0 + 2.0 * rng.standard_normal((5, 6, 17, 19))).astype(dtype)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dy = rng.standard_normal(x.shape).astype(dtype)
    dyl = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    c = x.shape[1]
    weight, bias = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    _, bn_mean, bn_invstd = foldnorm.batch_norm_train(x, num_threads=1)
    _, bnl_mean, bnl_invstd = foldnorm.batch_norm_train(xl, channel_axis=-1, num_threads=1)
    _, ln_mean, ln_invstd = foldnorm.layer_norm(x, axis=2, num_threads=1)
    _, invrms = foldnorm.rms_norm(x, axis=1, num_threads=1)
    _, gn_mean, gn_invstd = foldnorm.group_norm(x, 3, num_threads=1)
    _, in_mean, in_invstd = foldnorm.instance_norm(x, num_threads=1)
    return [
        ("batch_norm", lambda t: (foldnorm.batch_norm(x, bn_mean, bn_invstd, weight, bias, num_threads=t),)),
        ("batch_norm_last", lambda t: (foldnorm.batch_norm(xl, bnl_mean, bnl_invstd, channel_axis=-1,
                                                           num_threads=t),)),
        ("batch_norm_train", lambda t: foldnorm.batch_norm_train(x, weight, bias, num_threads=t)),
        ("batch_norm_train_last", lambda t: foldnorm.batch_norm_train(xl, channel_axis=-1, num_threads=t)),
        ("batch_norm_backward", lambda t: foldnorm.batch_norm_backward(dy, x, bn_mean, bn_invstd, weight,
                                                                       num_threads=t)),
        ("batch_norm_backward_last", lambda t: foldnorm.batch_norm_backward(
            dyl, xl, bnl_mean, bnl_invstd, channel_axis=-1, num_threads=t)),
        ("layer_norm", lambda t: foldnorm.layer_norm(x, axis=2, num_threads=t)),
        ("layer_norm_backward", lambda t: foldnorm.layer_norm_backward(dy, x, ln_mean, ln_invstd, axis=2,
                                                                       num_threads=t)),
        ("rms_norm", lambda t: foldnorm.rms_norm(x, axis=1, num_threads=t)),
        ("rms_norm_backward", lambda t: foldnorm.rms_norm_backward(dy, x, invrms, axis=1, num_threads=t)),
        ("group_norm", lambda t: foldnorm.group_norm(x, 3, weight, bias, num_threads=t)),
        ("group_norm_backward", lambda t: foldnorm.group_norm_backward(dy, x, gn_mean, gn_invstd, 3, weight,
                                                                       num_threads=t)),
        ("instance_norm", lambda t: foldnorm.instance_norm(x, weight, bias, num_threads=t)),
        ("instance_norm_backward", lambda t: foldnorm.instance_norm_backward(dy, x, in_mean, in_invstd,
                                                                             num_threads=t)),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_is_bit_identical_for_any_thread_count(caps_lifted, dtype):
    for name, run in _families(dtype):
        try:
            assert_bit_identical_across_threads(run, (1, 2, 3, 7, 8))
        except AssertionError as error:
            raise AssertionError("%s: %s" % (name, error)) from None


def test_a_capped_count_reaches_the_kernels_safely(monkeypatch):
    monkeypatch.setattr(runtime, "PARALLEL_GRAIN", 1)
    for name, run in _families(np.float32):
        assert_bit_identical_across_threads(run, (1, 100000, 2**31))


# Run in a fresh interpreter: whether the process has OpenMP worker threads (Linux lists them in
# /proc/self/task), and what the environment looks like after foldnorm has loaded.
_PROBE = r"""
import json, os, sys, time
import numpy as np
import foldnorm
from foldnorm.kernels import runtime

def threads():
    return len(os.listdir("/proc/self/task"))

small = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
large = np.random.default_rng(1).standard_normal((64, 128, 14, 14)).astype(np.float32)
before = threads()
for _ in range(20):
    foldnorm.batch_norm_train(small)
    foldnorm.layer_norm(small)
after_small = threads()
foldnorm.batch_norm_train(large, num_threads=2)
after_large = threads()
start = time.process_time()
time.sleep(0.2)
idle_cpu = time.process_time() - start
print(json.dumps({"before": before, "after_small": after_small, "after_large": after_large,
                  "idle_cpu": idle_cpu, "env": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")},
                  "cores": runtime.usable_cores(), "max_threads": foldnorm.get_num_threads()}))
"""


def _probe(**env):
    environment = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY",
                                                                    "OMP_NUM_THREADS")}
    environment.update(env)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", _PROBE], env=environment, cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


needs_proc_tasks = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
needs_two_cores = pytest.mark.skipif(runtime.usable_cores() < 2 or not foldnorm.build_info()["openmp"],
                                     reason="needs OpenMP and two usable cores")


@needs_proc_tasks
@needs_two_cores
def test_small_work_opens_no_parallel_region_and_idle_threads_do_not_spin_on():
    facts = _probe()
    assert facts["after_small"] == facts["before"]  # libgomp starts its workers at the first team
    assert facts["after_large"] > facts["before"]
    assert facts["env"] == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None}
    # The CPU the process burns while it sleeps for 0.2 s after a parallel call: a worker that spins for good
    # (OMP_WAIT_POLICY=active) burns most of it; by default it spins a few milliseconds, then sleeps (CPU
    # time is accounted in scheduler ticks, so a few milliseconds may show up either way).
    spinning = _probe(OMP_WAIT_POLICY="active")["idle_cpu"]
    assert facts["idle_cpu"] < 0.04 and facts["idle_cpu"] < spinning / 2, (facts["idle_cpu"], spinning)


@needs_proc_tasks
def test_omp_num_threads_above_the_cores_is_capped():
    facts = _probe(OMP_NUM_THREADS="100000")
    assert facts["max_threads"] == facts["cores"]
