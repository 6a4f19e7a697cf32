"""One rank of the multi-process tests: runs every case of sync_cases on its shard and saves what it got.

    mpiexec -n 3 python mpi_worker.py mpi OUT_DIR
    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python mpi_worker.py gloo OUT_DIR

Writes OUT_DIR/rank<r>.npz: for each case, the forward's y, mean, invstd and running statistics and the
backward's dx with this shard's and the whole batch's dweight and dbias; for each argument-error case, the
type and message of the exception this rank raised. The tests compare them with single-process runs.
"""
import os
import sys

import numpy as np

from foldnorm.distributed import TorchDistributedComm, sync_batch_norm_backward, sync_batch_norm_train
from sync_cases import CASES, EPS, MOMENTUM, Case


def communicator(engine):
    if engine == "mpi":
        from mpi4py import MPI

        return MPI.COMM_WORLD
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return TorchDistributedComm()


def run_case(case, comm, results, prefix=None):
    prefix = prefix or case.name
    x, dy, weight, bias, running_mean, running_var = case.data(comm.size)
    shard = case.split(x, comm.size)[comm.rank]
    dy_shard = case.split(dy, comm.size)[comm.rank]
    axis = case.channel_axis
    y, mean, invstd = sync_batch_norm_train(shard, weight, bias, comm, running_mean=running_mean,
                                            running_var=running_var, momentum=MOMENTUM, eps=EPS,
                                            channel_axis=axis)
    dx, dweight, dbias = sync_batch_norm_backward(dy_shard, shard, mean, invstd, weight, comm, channel_axis=axis)
    _, dweight_all, dbias_all = sync_batch_norm_backward(dy_shard, shard, mean, invstd, weight, comm,
                                                         channel_axis=axis, reduce_weight_grads=True)
    for name, value in [("y", y), ("mean", mean), ("invstd", invstd), ("running_mean", running_mean),
                        ("running_var", running_var), ("dx", dx), ("dweight", dweight), ("dbias", dbias),
                        ("dweight_all", dweight_all), ("dbias_all", dbias_all)]:
        results["%s/%s" % (prefix, name)] = value


def error_cases(comm):
    """(name, call) pairs: each call makes one rank's arguments wrong; every rank must raise."""
    rank, last = comm.rank, comm.size - 1
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((3, 4, 5))
    w = np.ones(4)

    def train(xs=x, weight=w, eps=EPS, **kw):
        return sync_batch_norm_train(xs, weight, None, comm, eps=eps, **kw)

    def backward_bad_dy():
        y, mean, invstd = train()
        dy = np.ones_like(y) if rank != last else np.ones((3, 4))
        return sync_batch_norm_backward(dy, x, mean, invstd, w, comm)

    cases = [
        ("weight_shape_on_last_rank", lambda: train(weight=w if rank != last else np.ones(3))),
        ("int_x_on_rank_0", lambda: train(xs=x if rank != 0 else np.ones((3, 4, 5), np.int64))),
        ("channel_axis_on_last_rank", lambda: train(channel_axis=1 if rank != last else 2)),
        ("too_few_values", lambda: train(xs=np.ones((1 if rank == 0 else 0, 4)))),
        ("eps_string_on_rank_0", lambda: train(eps=EPS if rank != 0 else "1e-5")),
        ("backward_dy_shape_on_last_rank", backward_bad_dy),
    ]
    if comm.size > 1:
        cases += [
            ("channels_disagree", lambda: train(xs=x if rank != last else np.ones((3, 5, 5)), weight=None)),
            ("eps_disagree", lambda: train(eps=EPS if rank != 0 else 1e-3)),
            # Not an error: equal values of different bits agree.
            ("eps_signed_zeros", lambda: train(eps=0.0 if rank != last else -0.0)),
        ]
    return cases


def main(engine, out_dir):
    comm = communicator(engine)
    results = {}
    for case in CASES:
        run_case(case, comm, results)
    for name, call in error_cases(comm):
        try:
            call()
            results[name + "/error_type"] = np.array("none")
        except Exception as error:  # recorded for the test to judge
            results[name + "/error_type"] = np.array(type(error).__name__)
            results[name + "/error_message"] = np.array(str(error))
    # The collectives are still paired up after every refusal: a last case runs as the first did.
    run_case(CASES[0], comm, results, prefix="after_errors")
    np.savez(os.path.join(out_dir, "rank%d.npz" % comm.rank), **results)
    if engine == "gloo":
        # gloo's threads must be joined before the interpreter exits, or a rank can abort at exit
        # ("terminate called without an active exception") after its results are written.
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
