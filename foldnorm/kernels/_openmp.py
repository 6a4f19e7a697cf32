"""How idle OpenMP threads wait: chosen once, before the compiled kernels load the OpenMP runtime.

GNU libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when it is loaded.  By default a thread that
waits (for the next parallel region, or at a barrier for a slower thread) spins about 300,000 times,
milliseconds, before it sleeps.  On a quiet machine that makes back-to-back regions cheap; on a machine
with more runnable threads than cores it is a disaster: the spinning threads take the cores from the ones
that have work, and a thread waiting at a barrier for a descheduled team-mate burns its whole time slice
(the benchmarks README gives the measurements).  So unless the user has chosen a policy, the kernels load
libgomp with GOMP_SPINCOUNT=0, the passive policy: a waiting thread sleeps at once and wakes when its
work is ready, and the wrappers keep teams for work large enough to pay for that wake-up
(runtime.PARALLEL_GRAIN).

The variable is set only while the extensions load and removed afterwards, so child processes do not
inherit it.  It has no effect when libgomp was already loaded by another library (torch, scikit-learn)
imported first; set OMP_WAIT_POLICY=passive in the environment to get the same in that case, or
OMP_WAIT_POLICY=active (or any GOMP_SPINCOUNT) to keep spinning.
"""
import contextlib
import os

# The variables by which a user chooses libgomp's waiting; when either is set, foldnorm sets nothing.
POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
PASSIVE_SPINCOUNT = "0"


@contextlib.contextmanager
def passive_wait_while_loading():
    """Within the block, GOMP_SPINCOUNT=0 in the environment unless the user chose a wait policy."""
    if any(name in os.environ for name in POLICY_VARIABLES):
        yield
        return
    os.environ["GOMP_SPINCOUNT"] = PASSIVE_SPINCOUNT
    try:
        yield
    finally:
        os.environ.pop("GOMP_SPINCOUNT", None)
