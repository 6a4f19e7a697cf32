"""Data-parallel training of a small NumPy network with batch norm synchronized across processes.

Every process (rank) holds the same parameters and a shard of each batch; batch norm uses the whole
batch's statistics (foldnorm.distributed), and the parameter gradients are added up over the ranks, so
that N ranks train exactly as one process on the whole batch would:

    mpiexec -n 2 python examples/sync_batch_norm_training.py          # two ranks, each half of every batch
    python examples/sync_batch_norm_training.py --single                # one process, plain batch norm

The network classifies three interleaved spirals: Linear -> BatchNorm -> ReLU, twice, then Linear and
softmax cross-entropy, trained with SGD on float64 (or --dtype float32). Rank 0 prints the loss every
10 steps and the accuracy with the running statistics at the end; --out writes the loss curve as JSON.
"""
import argparse
import json
import sys

import numpy as np

import foldnorm
from foldnorm.distributed import sync_batch_norm_backward, sync_batch_norm_train

HIDDEN = 64
CLASSES = 3
MOMENTUM = 0.1
EPS = 1e-5


class OneProcess:
    """The communicator of a lone process (what the synchronized functions see with one rank)."""

    rank, size = 0, 1

    def allgather(self, obj):
        return [obj]


def world():
    """MPI.COMM_WORLD when mpi4py is installed, else a lone process."""
    try:
        from mpi4py import MPI
    except ImportError:
        return OneProcess()
    return MPI.COMM_WORLD


def spirals(count, seed=0):
    """count points of three interleaved noisy spirals in the plane, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=count)
    radius = rng.uniform(0.05, 1.0, size=count)
    angle = 4.0 * radius + labels * (2.0 * np.pi / CLASSES) + rng.normal(0.0, 0.15, size=count)
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1) * 3.0 + 1.0
    return points, labels


def initial_parameters(dtype, seed=1):
    rng = np.random.default_rng(seed)
    he = lambda fan_in, shape: (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)  # noqa: E731
    return {
        "w1": he(2, (2, HIDDEN)), "gamma1": np.ones(HIDDEN, dtype), "beta1": np.zeros(HIDDEN, dtype),
        "w2": he(HIDDEN, (HIDDEN, HIDDEN)), "gamma2": np.ones(HIDDEN, dtype), "beta2": np.zeros(HIDDEN, dtype),
        "w3": he(HIDDEN, (HIDDEN, CLASSES)), "b3": np.zeros(CLASSES, dtype),
    }


class BatchNorm:
    """Training-mode batch norm over the feature axis of (N, features) activations: synchronized over
    comm, or foldnorm's single-process kernels when comm is None."""

    def __init__(self, comm, features):
        self.comm = comm
        self.running_mean, self.running_var = np.zeros(features), np.ones(features)

    def forward(self, h, gamma, beta):
        if self.comm is None:
            y, mean, invstd = foldnorm.batch_norm_train(h, gamma, beta, running_mean=self.running_mean,
                                                        running_var=self.running_var, momentum=MOMENTUM, eps=EPS)
        else:
            y, mean, invstd = sync_batch_norm_train(h, gamma, beta, self.comm, running_mean=self.running_mean,
                                                    running_var=self.running_var, momentum=MOMENTUM, eps=EPS)
        self.saved = (h, mean, invstd, gamma)
        return y

    def backward(self, dy):
        h, mean, invstd, gamma = self.saved
        if self.comm is None:
            return foldnorm.batch_norm_backward(dy, h, mean, invstd, gamma)
        # This shard's dgamma and dbeta: added up over the ranks with the other gradients.
        return sync_batch_norm_backward(dy, h, mean, invstd, gamma, self.comm)

    def infer(self, h, gamma, beta):
        return foldnorm.batch_norm(h, self.running_mean, self.running_var, gamma, beta, eps=EPS)


def loss_and_gradients(params, norms, x, labels, batch_size):
    """This shard's share of the mean cross-entropy over the whole batch of batch_size samples, and the
    gradients of that share (whose sum over the ranks is the gradient of the whole batch's loss)."""
    h1 = x @ params["w1"]
    y1 = norms[0].forward(h1, params["gamma1"], params["beta1"])
    a1 = np.maximum(y1, 0)
    h2 = a1 @ params["w2"]
    y2 = norms[1].forward(h2, params["gamma2"], params["beta2"])
    a2 = np.maximum(y2, 0)
    logits = a2 @ params["w3"] + params["b3"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -log_p[rows, labels].sum() / batch_size

    dlogits = np.exp(log_p)
    dlogits[rows, labels] -= 1.0
    dlogits /= batch_size
    grads = {"w3": a2.T @ dlogits, "b3": dlogits.sum(axis=0)}
    dy2 = (dlogits @ params["w3"].T) * (y2 > 0)
    dh2, grads["gamma2"], grads["beta2"] = norms[1].backward(dy2)
    grads["w2"] = a1.T @ dh2
    dy1 = (dh2 @ params["w2"].T) * (y1 > 0)
    dh1, grads["gamma1"], grads["beta1"] = norms[0].backward(dy1)
    grads["w1"] = x.T @ dh1
    return loss, grads


def sum_over_ranks(comm, values):
    """Every rank's dict of arrays (or floats) added up in rank order: the same bits on every rank."""
    if comm is None:
        return values
    gathered = comm.allgather(values)
    total = {key: value for key, value in gathered[0].items()}
    for other in gathered[1:]:
        total = {key: total[key] + other[key] for key in total}
    return total


def train(comm, steps, batch_size, lr, dtype, seed=0):
    """Train; returns the loss of the whole batch at every step and the final accuracy on the data
    (inference with the running statistics), identical on every rank."""
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    points, labels = spirals(3000, seed)
    points = points.astype(dtype)
    params = initial_parameters(dtype, seed + 1)
    norms = [BatchNorm(comm, HIDDEN), BatchNorm(comm, HIDDEN)]
    order = np.random.default_rng(seed + 2).permutation(len(points))
    losses = []
    for step in range(steps):
        start = (step * batch_size) % (len(points) - batch_size + 1)
        batch = order[start:start + batch_size]
        shard = np.array_split(batch, size)[rank]  # uneven when size does not divide batch_size
        loss, grads = loss_and_gradients(params, norms, points[shard], labels[shard], batch_size)
        totals = sum_over_ranks(comm, dict(grads, loss=np.float64(loss)))
        losses.append(float(totals.pop("loss")))
        for key, grad in totals.items():
            params[key] = (params[key] - lr * grad).astype(dtype)
    a1 = np.maximum(norms[0].infer(points @ params["w1"], params["gamma1"], params["beta1"]), 0)
    a2 = np.maximum(norms[1].infer(a1 @ params["w2"], params["gamma2"], params["beta2"]), 0)
    accuracy = float(np.mean(np.argmax(a2 @ params["w3"] + params["b3"], axis=1) == labels))
    return losses, accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=100, help="samples per step, over all ranks together")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--single", action="store_true",
                        help="one process on the whole batch with foldnorm's single-process kernels")
    parser.add_argument("--out", help="write {'losses': [...], 'accuracy': a, 'ranks': n} here (rank 0)")
    args = parser.parse_args(argv)
    comm = None if args.single else world()
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    losses, accuracy = train(comm, args.steps, args.batch, args.lr, np.dtype(args.dtype))
    if rank == 0:
        mode = "one process, plain batch norm" if comm is None else "%d rank(s), synchronized batch norm" % size
        print("%s, batch %d, %s" % (mode, args.batch, args.dtype))
        for step in range(0, len(losses), 10):
            print("step %4d  loss %.6f" % (step, losses[step]))
        print("final loss %.6f, accuracy %.3f with the running statistics" % (losses[-1], accuracy))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"losses": losses, "accuracy": accuracy, "ranks": size}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
