"""Batch normalization synchronized across processes, for data-parallel training of NumPy models.

Each process (rank) holds a shard of the batch; the statistics must be those of the whole batch. A
training step exchanges per-channel summaries only, never the data:

- forward: every rank computes its shard's ``(count, mean, m2)`` per channel in float64 (centred two-pass
  sums, never ``E[x^2] - E[x]^2``), all ranks gather everyone's summaries and merge them with Chan's
  update in rank order, then normalize their own shard with the merged statistics;
- backward: every rank computes its shard's ``(count, sum(dy), sum(dy * (x - mean)))`` in float64, all
  ranks gather them and add them up in rank order, then compute their own ``dx``.

Gathering and merging in a fixed order on every rank (rather than an MPI reduction, whose order MPI
chooses) gives every rank the same statistics bit for bit. Summaries travel as ``(count, mean, m2)``
rather than ``(mean, invstd)``, so that nothing is lost rounding through ``eps``. Shards may differ in
size, and a shard may be empty.

The building blocks (`local_stats`, `merge_stats`, `normalize`, `local_grad_sums`, `merge_grad_sums`,
`normalize_backward`) take and return NumPy arrays and need no communication; `sync_batch_norm_train`
and `sync_batch_norm_backward` compose them around one collective each. They are the compiled pieces of
foldnorm's batch-norm kernels, split as PyTorch's ATen splits its SyncBatchNorm: `batch_norm_train`'s
statistics pass and apply pass, `batch_norm_backward`'s reduction and apply, with float64 statistics and
sums for every dtype, and the kernels' argument checks. The GIL is released while they run.

Threads
-------
Ranks on one machine share its cores: with ``num_threads=None`` each rank uses
``usable_cores // ranks_on_this_node()`` threads (at most `foldnorm.get_num_threads()`), the ranks on the
machine as the launcher reports them (MPICH's ``MPI_LOCALNRANKS``, Open MPI's
``OMPI_COMM_WORLD_LOCAL_SIZE``, torchrun's ``LOCAL_WORLD_SIZE``), so that they never run more threads than
it has cores. An explicit ``num_threads`` is used as given.

Communicators
-------------
``comm`` is anything with the `Communicator` protocol: ``rank`` and ``size`` attributes and
``allgather(obj) -> list`` returning every rank's object in rank order. An mpi4py communicator
(``mpi4py.MPI.COMM_WORLD``) is one as it is; `TorchDistributedComm` adapts a ``torch.distributed``
process group (gloo). This module imports neither: mpi4py is needed only to make an MPI communicator.
Over mpi4py the summaries travel through its buffer collective ``Allgather`` as float64 arrays (a header
of the values ranks must agree on, then one row per rank: the count and the 2C statistics), which spares
pickling them; every rank merges the rows where the collective leaves them.

Every argument is checked on its own rank first, and the outcome travels with the summaries in the
same collective: when any rank's arguments are wrong, every rank raises (the same exception type, the
message naming the rank), so no rank is left waiting in a collective the others never enter.
"""
from .statistics import (ChannelStats, GradSums, local_grad_sums, local_stats, merge_grad_sums, merge_stats,
                         normalize, normalize_backward, ranks_on_this_node, shard_threads)
from .sync import Communicator, TorchDistributedComm, sync_batch_norm_backward, sync_batch_norm_train

__all__ = [
    "Communicator",
    "TorchDistributedComm",
    "ChannelStats",
    "GradSums",
    "local_stats",
    "merge_stats",
    "normalize",
    "local_grad_sums",
    "merge_grad_sums",
    "normalize_backward",
    "sync_batch_norm_train",
    "sync_batch_norm_backward",
    "ranks_on_this_node",
    "shard_threads",
]
