"""How many threads a call runs, and how idle ones wait.

Results are bit-identical for any thread count, including counts the caps would never pick on this
machine (the caps are lifted here through runtime's module attributes), and whichever threads of the team
did the work; a call too small to pay for a team starts no worker; a call never waits for a worker that is
not scheduled (the caller takes its work, counted by the pool); idle workers spin at most 20 ms, then sleep; and
foldnorm leaves the environment as it was.
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


# Run in a fresh interpreter: the process's threads (Linux lists them in /proc/self/task), the pool's counters,
# and what the environment looks like after foldnorm has loaded.
_PROBE = r"""
import json, os, sys, time
import numpy as np
import foldnorm
from foldnorm.kernels import runtime, _runtime

def threads():
    return len(os.listdir("/proc/self/task"))

small = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
large = np.random.default_rng(1).standard_normal((64, 128, 14, 14)).astype(np.float32)
before = threads()
for _ in range(20):
    foldnorm.batch_norm_train(small)
    foldnorm.layer_norm(small)
after_small = threads()
stats_small = _runtime.pool_stats()
foldnorm.batch_norm_train(large, num_threads=2)
after_large = threads()
start = time.process_time()
time.sleep(0.2)
idle_cpu = time.process_time() - start
print(json.dumps({"before": before, "after_small": after_small, "after_large": after_large,
                  "stats_small": stats_small, "stats_large": _runtime.pool_stats(), "idle_cpu": idle_cpu,
                  "env": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")},
                  "cores": runtime.usable_cores(), "max_threads": foldnorm.get_num_threads()}))
"""


def _run(script, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY",
                                                                    "OMP_NUM_THREADS")}
    environment.update(env)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script], env=environment, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(**env):
    return _run(_PROBE, **env)


needs_proc_tasks = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
needs_two_cores = pytest.mark.skipif(runtime.usable_cores() < 2 or not foldnorm.build_info()["openmp"],
                                     reason="needs OpenMP and two usable cores")


@needs_proc_tasks
@needs_two_cores
def test_small_work_starts_no_worker_and_idle_workers_sleep():
    facts = _probe()
    # Small calls run on the calling thread: no team, no worker started.
    assert facts["after_small"] == facts["before"]
    assert facts["stats_small"]["team_regions"] == 0 and facts["stats_small"]["workers_started"] == 0
    # A large call with two threads starts one worker (the caller is the other thread of the team).
    assert facts["stats_large"]["workers_started"] == 1 and facts["after_large"] == facts["before"] + 1
    assert facts["stats_large"]["team_regions"] >= 1
    assert facts["env"] == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None}
    # The CPU the process burns while it sleeps for 0.2 s after a parallel call: the worker spins for at
    # most 20 ms (50 us where the machine has no core to spare), then sleeps; one that never slept would
    # burn the whole 0.2 s (CPU time is accounted in scheduler ticks, so a few milliseconds may show up
    # either way).
    assert facts["idle_cpu"] < 0.06, facts["idle_cpu"]


@needs_proc_tasks
def test_omp_num_threads_above_the_cores_is_capped():
    facts = _probe(OMP_NUM_THREADS="100000")
    assert facts["max_threads"] == facts["cores"]


# Idle workers on a machine where threads wait for cores: one spinning process more than there are cores, so
# every look at the machine finds a runnable thread without one.  A worker then never spins to its long limit
# (meant for a machine with a core to spare): it ends each spin early, or sleeps after its short one where
# the machine's count cannot be read.  Counted by the pool, not timed.
_CROWDED = r"""
import json, os, subprocess, sys, time
import numpy as np
import foldnorm
from foldnorm.kernels import _runtime
spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() + 1)]
try:
    time.sleep(0.3)
    x = np.random.default_rng(1).standard_normal((64, 128, 14, 14)).astype(np.float32)
    for _ in range(10):
        foldnorm.batch_norm_train(x, num_threads=2)
        time.sleep(0.03)
finally:
    for s in spinners:
        s.kill()
        s.wait()
stats = _runtime.pool_stats()
# The pool reads the machine's count where the process may use every online core.
stats["count_known"] = len(os.sched_getaffinity(0)) == os.cpu_count() and os.access("/proc/loadavg", os.R_OK)
print(json.dumps(stats))
"""


@needs_proc_tasks
@needs_two_cores
def test_idle_workers_do_not_spin_long_while_threads_wait_for_cores():
    stats = _run(_CROWDED)
    assert stats["workers_started"] == 1
    assert stats["spins_to_idle_limit"] == 0, stats
    if stats["count_known"]:
        # Each spin after the ten calls ended early: a look found threads waiting, or the worker was preempted.
        assert stats["spins_ended_busy"] >= 1, stats


# Every kernel run with two threads while no worker can join (as if the operating system never scheduled
# one): each call must finish with the caller doing every unit, and give the one-thread results.  A call
# that waited for the worker would never return (the subprocess's timeout fails the test).
_HELD = r"""
import json, sys
import numpy as np
from foldnorm.kernels import runtime, _runtime
runtime.PARALLEL_GRAIN = 1
runtime.usable_cores = lambda: 8
sys.path.insert(0, ".")
from tests.kernels.test_threads import _families

_runtime.hold_workers(True)
mismatched = []
before = _runtime.pool_stats()
for dtype in (np.float32, np.float64):
    for name, run in _families(dtype):
        one, two = run(1), run(2)
        if any(a.tobytes() != b.tobytes() for a, b in zip(one, two)):
            mismatched.append(name)
after = _runtime.pool_stats()
print(json.dumps({"mismatched": mismatched, "before": before, "after": after}))
"""


def test_a_call_never_waits_for_a_worker_that_is_not_scheduled():
    facts = _run(_HELD)
    assert facts["mismatched"] == []
    before, after = facts["before"], facts["after"]
    assert after["team_regions"] > before["team_regions"]      # the two-thread calls did open teams
    assert after["worker_units"] == before["worker_units"]     # no worker did any of it
    assert after["caller_units"] > before["caller_units"]


# Workers do join when they can: a large two-thread call repeated until a worker has done some of its units
# (on a busy machine a worker may miss many calls; the loop only ends early).
_JOINS = r"""
import json, time
import numpy as np
import foldnorm
from foldnorm.kernels import _runtime
x = np.random.default_rng(2).standard_normal((64, 128, 14, 14)).astype(np.float32)
reference = foldnorm.batch_norm_train(x, num_threads=1)
deadline = time.monotonic() + 60
calls = 0
while _runtime.pool_stats()["worker_units"] == 0 and time.monotonic() < deadline:
    result = foldnorm.batch_norm_train(x, num_threads=2)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(result, reference))
    calls += 1
print(json.dumps({"stats": _runtime.pool_stats(), "calls": calls}))
"""


@needs_two_cores
def test_workers_share_the_work_when_they_are_scheduled():
    facts = _run(_JOINS)
    assert facts["stats"]["worker_units"] > 0, facts


def test_calls_from_several_python_threads_at_once(caps_lifted):
    # The pool runs one team at a time; a call that finds it busy runs on its own thread.  Either way every
    # result is the one-thread result.
    import threading

    runs = _families(np.float32)
    expected = {name: run(1) for name, run in runs}
    failures = []

    def hammer():
        for _ in range(5):
            for name, run in runs:
                got = run(4)
                if any(a.tobytes() != b.tobytes() for a, b in zip(expected[name], got)):
                    failures.append(name)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# A child forked after the parent started its workers has none of them: it starts its own.
_FORK = r"""
import json, os
import numpy as np
import foldnorm
from foldnorm.kernels import _runtime
x = np.random.default_rng(3).standard_normal((64, 128, 14, 14)).astype(np.float32)
reference = foldnorm.batch_norm_train(x, num_threads=1)[0]
foldnorm.batch_norm_train(x, num_threads=2)
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    y = foldnorm.batch_norm_train(x, num_threads=2)[0]
    os.write(write, json.dumps({"same": y.tobytes() == reference.tobytes(),
                                "workers": _runtime.pool_stats()["workers_started"]}).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(os.read(read, 4096).decode())
"""


@needs_two_cores
def test_a_forked_child_runs_its_own_team():
    facts = _run(_FORK)
    assert facts["same"]
    assert facts["workers"] >= 2  # the parent's one, counted before the fork, and the child's own
