"""Fused normalizations against the passes they save: `python -m benchmarks fused [--quick|--smoke]`.

Each case is one fused foldnorm kernel (an activation applied in the pass that writes y, or the residual add
done in the pass that reads x) timed beside the same work done the way other code does it:

- unfused: foldnorm's kernel and NumPy for the rest (batch_norm_train, then NumPy's relu/silu in place; np.add,
  then layer_norm), what a foldnorm user without the fused kernels would write;
- torch: torch eager's composition, one ATen kernel per step (F.batch_norm then F.relu; x + residual then
  F.layer_norm; the backward steps as autograd runs them: the activation's backward, then the norm's);
- torch.compile: the same composition through inductor, which fuses pointwise steps into its own loops (its
  compile time is not timed; it is skipped with a note where it does not compile);
- copy: foldnorm's multi-threaded copy of x, the bandwidth roof.

All run in this one process at the same thread count (2 by default), interleaved round by round (harness.measure),
each call followed by the pause that lets the previous contender's spinning threads stop; every time is the
median over the rounds, every ratio the median over the rounds of the two times of one round.  The backward contenders get what their API needs from a
forward run beforehand (the unfused and torch ones keep the pre-activation y, as autograd does; the fused one
recomputes it from x).  The fused kernels' last-level-cache bytes are in the deterministic counts
(counts.py, FUSED_COUNT_CASES), beside the same norm without the fusion.
"""
import os

import numpy as np

from .harness import (
    Contender,
    Unavailable,
    first_line,
    foldnorm_function,
    measure,
    parallel_copy,
    paired_ratio,
    settle_seconds,
    thread_settings_kept,
)
from .kernels import EPS, KernelCase

BN_SHAPE = (32, 256, 28, 28)
GN_SHAPE = (16, 256, 32, 32)
ROW_SHAPE = (8192, 768)

FUSED_CASES = [
    KernelCase("batch_norm_train+relu", BN_SHAPE),
    KernelCase("batch_norm_backward+relu", BN_SHAPE),
    KernelCase("batch_norm_train+silu", BN_SHAPE),
    KernelCase("batch_norm_backward+silu", BN_SHAPE),
    KernelCase("group_norm+silu", GN_SHAPE, groups=32),
    KernelCase("group_norm_backward+silu", GN_SHAPE, groups=32),
    KernelCase("add_layer_norm", ROW_SHAPE),
    KernelCase("add_layer_norm_backward", ROW_SHAPE),
    KernelCase("add_rms_norm", ROW_SHAPE),
    KernelCase("add_rms_norm_backward", ROW_SHAPE),
]
QUICK_FUSED_CASES = [c for c in FUSED_CASES if "silu" not in c.kernel or "group" in c.kernel]
SMOKE_FUSED_CASES = [KernelCase("batch_norm_train+relu", (2, 8, 4, 4)), KernelCase("add_rms_norm", (16, 64))]
# The counts (8 MiB tensors, as counts.COUNT_CASES): each fused kernel and, for the residual ones, the unfused
# composition; the activation-fused ones compare with COUNT_CASES' same norm without the activation.
FUSED_COUNT_CASES = [
    KernelCase("batch_norm_train+relu", (8, 64, 64, 64)),
    KernelCase("batch_norm_train+silu", (8, 64, 64, 64)),
    KernelCase("batch_norm_backward+relu", (8, 64, 64, 64)),
    KernelCase("batch_norm_backward+silu", (8, 64, 64, 64)),
    KernelCase("group_norm+silu", (8, 64, 64, 64), groups=32),
    KernelCase("group_norm_backward+silu", (8, 64, 64, 64), groups=32),
    KernelCase("add_layer_norm", (2048, 1024)),
    KernelCase("add_layer_norm unfused", (2048, 1024)),
    KernelCase("add_layer_norm_backward", (2048, 1024)),
    KernelCase("add_layer_norm_backward unfused", (2048, 1024)),
    KernelCase("add_rms_norm", (2048, 1024)),
    KernelCase("add_rms_norm unfused", (2048, 1024)),
    KernelCase("add_rms_norm_backward", (2048, 1024)),
    KernelCase("add_rms_norm_backward unfused", (2048, 1024)),
]
# Tensors each fused kernel must read and write once (the byte budget of the residual targets).
TENSORS_MOVED = {"add_layer_norm": 4, "add_rms_norm": 4, "add_layer_norm_backward": 4, "add_rms_norm_backward": 4}


def _torch():
    try:
        import torch
    except ImportError:
        raise Unavailable("torch is not importable") from None
    return torch


def _fused_function(kernel, activation):
    """foldnorm's fused kernel (through harness.foldnorm_function, so the slowdown hook reaches it), when this
    build has it: an A/B base may predate the fused kernels."""
    import inspect

    function = foldnorm_function(kernel)
    if activation and "activation" not in inspect.signature(function).parameters:
        raise Unavailable("this foldnorm build has no fused %s+%s" % (kernel, activation))
    return function


def _np_act(y, activation):
    """NumPy's activation of y in place (the unfused composition's second pass)."""
    if activation == "relu":
        np.maximum(y, 0, out=y)
    else:
        y /= 1 + np.exp(-y)


def _np_act_grad(dy, pre, activation, g):
    if activation == "relu":
        np.multiply(dy, pre > 0, out=g)
    else:
        s = 1 / (1 + np.exp(-pre))
        np.multiply(dy, s * (1 + pre * (1 - s)), out=g)


class FusedBench:
    """Data of one case and a factory per contender (each raises Unavailable when it cannot run here); the
    foldnorm calls return y (forward) or dx (backward) first."""

    def __init__(self, case, rng):
        self.case = case
        base, _, self.activation = case.kernel.partition("+")
        self.kernel = base.split(" ")[0]
        self.composed = base.endswith(" unfused")
        self.backward = self.kernel.endswith("_backward")
        self.x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 0.5).astype(np.float32)
        self.other = rng.standard_normal(case.shape, dtype=np.float32)  # dy, or the residual
        self.ds = rng.standard_normal(case.shape, dtype=np.float32)
        self.channels = case.shape[1] if not self.kernel.startswith("add_") else case.shape[-1]
        self.weight = rng.uniform(0.5, 1.5, self.channels)
        self.bias = rng.uniform(-0.5, 0.5, self.channels)
        self.out = np.empty_like(self.x)
        self.out2 = np.empty_like(self.x)

    def foldnorm(self, threads):
        """The call the counts make (worker.py): the fused kernel, or the composition of an `unfused` case."""
        return self.unfused(threads) if self.composed else self.fused(threads)

    def fused(self, threads):
        import foldnorm

        fn = _fused_function(self.kernel, self.activation)
        x, w, b, act, out, groups = self.x, self.weight, self.bias, self.activation or None, self.out, self.case.groups
        if self.kernel == "batch_norm_train":
            return lambda: fn(x, w, b, activation=act, out=out, num_threads=threads)
        if self.kernel == "group_norm":
            return lambda: fn(x, groups, w, b, activation=act, num_threads=threads)
        if self.kernel == "batch_norm_backward":
            _, mean, invstd = foldnorm.batch_norm_train(x, w, b, activation=act)
            return lambda: fn(self.other, x, mean, invstd, w, bias=b, activation=act, num_threads=threads)
        if self.kernel == "group_norm_backward":
            _, mean, invstd = foldnorm.group_norm(x, groups, w, b, activation=act)
            return lambda: fn(self.other, x, mean, invstd, groups, w, bias=b, activation=act, num_threads=threads)
        if self.kernel == "add_layer_norm":
            return lambda: fn(x, self.other, w, b, out=out, s_out=self.out2, num_threads=threads)
        if self.kernel == "add_rms_norm":
            return lambda: fn(x, self.other, w, out=out, s_out=self.out2, num_threads=threads)
        if self.kernel == "add_layer_norm_backward":
            _, mean, invstd = foldnorm.layer_norm(x, w, b)
            return lambda: fn(self.other, self.ds, x, mean, invstd, w, num_threads=threads)
        _, invrms = foldnorm.rms_norm(x, w)
        return lambda: fn(self.other, self.ds, x, invrms, w, num_threads=threads)

    # foldnorm's kernels and NumPy, unfused
    def unfused(self, threads):
        import foldnorm

        x, w, b, act, out = self.x, self.weight, self.bias, self.activation, self.out
        if self.kernel == "batch_norm_train":
            def run():
                foldnorm.batch_norm_train(x, w, b, out=out, num_threads=threads)
                _np_act(out, act)
                return out
            return run
        if self.kernel == "group_norm":
            def run():
                y, _, _ = foldnorm.group_norm(x, self.case.groups, w, b, num_threads=threads)
                _np_act(y, act)
                return y
            return run
        if self.kernel in ("batch_norm_backward", "group_norm_backward"):
            groups = self.case.groups
            if self.kernel == "batch_norm_backward":
                pre, mean, invstd = foldnorm.batch_norm_train(x, w, b)
                norm_backward = lambda g: foldnorm.batch_norm_backward(g, x, mean, invstd, w, num_threads=threads)
            else:
                pre, mean, invstd = foldnorm.group_norm(x, groups, w, b)
                norm_backward = lambda g: foldnorm.group_norm_backward(g, x, mean, invstd, groups, w,
                                                                       num_threads=threads)

            def run():
                _np_act_grad(self.other, pre, act, out)
                return norm_backward(out)[0]
            return run
        if self.kernel in ("add_layer_norm", "add_rms_norm"):
            norm = (lambda s: foldnorm.layer_norm(s, w, b, num_threads=threads)) if self.kernel == "add_layer_norm" \
                else (lambda s: foldnorm.rms_norm(s, w, num_threads=threads))

            def run():
                np.add(x, self.other, out=self.out2)
                return norm(self.out2)[0]
            return run
        if self.kernel == "add_layer_norm_backward":
            _, mean, invstd = foldnorm.layer_norm(x, w, b)
            grads = lambda: foldnorm.layer_norm_backward(self.other, x, mean, invstd, w, num_threads=threads)
        else:
            _, invrms = foldnorm.rms_norm(x, w)
            grads = lambda: foldnorm.rms_norm_backward(self.other, x, invrms, w, num_threads=threads)

        def run():
            dx = grads()[0]
            return np.add(dx, self.ds, out=dx)
        return run

    # torch: the eager composition, and the same through inductor
    def _torch_steps(self, torch):
        """(function of tensors, its tensor arguments): the composition as torch code."""
        F = torch.nn.functional
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        x, other, ds, w, b = t(self.x), t(self.other), t(self.ds), t(self.weight), t(self.bias)
        act = {"relu": F.relu, "silu": F.silu}.get(self.activation)
        aten = torch.ops.aten
        if self.kernel == "batch_norm_train":
            return (lambda x, w, b: act(F.batch_norm(x, None, None, w, b, training=True, eps=EPS))), (x, w, b)
        if self.kernel == "group_norm":
            groups = self.case.groups
            return (lambda x, w, b: act(F.group_norm(x, groups, w, b, eps=EPS))), (x, w, b)
        if self.kernel == "batch_norm_backward":
            pre, mean, invstd = aten.native_batch_norm(x, w, b, None, None, True, 0.1, EPS)
            act_backward = self._torch_act_backward(torch)

            def backward(dy, x, pre, w, mean, invstd):
                g = act_backward(dy, pre)
                return aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, EPS,
                                                       [True, True, True])
            return backward, (other, x, pre, w, mean, invstd)
        if self.kernel == "group_norm_backward":
            n, c = self.case.shape[:2]
            hw = int(np.prod(self.case.shape[2:]))
            groups = self.case.groups
            pre, mean, rstd = aten.native_group_norm(x, w, b, n, c, hw, groups, EPS)
            act_backward = self._torch_act_backward(torch)

            def backward(dy, x, pre, w, mean, rstd):
                g = act_backward(dy, pre)
                return aten.native_group_norm_backward(g, x, mean, rstd, w, n, c, hw, groups, [True, True, True])
            return backward, (other, x, pre, w, mean, rstd)
        cols = self.case.shape[-1]
        if self.kernel == "add_layer_norm":
            return (lambda x, r, w, b: (F.layer_norm(x + r, (cols,), w, b, eps=EPS), x + r)), (x, other, w, b)
        if self.kernel == "add_rms_norm":
            return (lambda x, r, w: (F.rms_norm(x + r, (cols,), w, eps=EPS), x + r)), (x, other, w)
        if self.kernel == "add_layer_norm_backward":
            _, mean, rstd = aten.native_layer_norm(x, (cols,), w, b, EPS)

            def backward(dy, ds, s, mean, rstd, w, b):
                dx, dw, db = aten.native_layer_norm_backward(dy, s, (cols,), mean, rstd, w, b, [True, True, True])
                return dx + ds, dw, db
            return backward, (other, ds, x, mean, rstd, w, b)
        invrms = torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS)

        def backward(dy, ds, s, invrms, w):
            # What autograd runs for s * invrms * w: elementwise and reduction kernels, one after another.
            g = dy * w
            c = (g * s).mean(-1, keepdim=True) * invrms ** 3
            return g * invrms - s * c + ds, (dy * s * invrms).sum(0)
        return backward, (other, ds, x, invrms, w)

    def _torch_act_backward(self, torch):
        aten = torch.ops.aten
        if self.activation == "relu":
            return lambda dy, pre: aten.threshold_backward(dy, torch.relu(pre), 0)
        return lambda dy, pre: aten.silu_backward(dy, pre)

    def torch_eager(self, threads):
        torch = _torch()
        function, args = self._torch_steps(torch)
        return _torch_call(torch, function, args, threads)

    def torch_compiled(self, threads):
        torch = _torch()
        function, args = self._torch_steps(torch)
        torch.set_num_threads(threads)
        try:
            compiled = torch.compile(function, dynamic=False)
            with torch.no_grad():
                compiled(*args)
        except Exception as error:  # inductor needs a working C++ toolchain; any failure is reported, not fatal
            raise Unavailable("torch.compile failed here: %s" % first_line(error)) from None
        return _torch_call(torch, compiled, args, threads)


def _torch_call(torch, function, args, threads):
    def run():
        torch.set_num_threads(threads)
        with torch.no_grad():
            return function(*args)
    return run


BENCHES = {case.kernel: FusedBench for case in FUSED_CASES + FUSED_COUNT_CASES}
CONTENDERS = ("fused", "unfused", "torch", "torch.compile", "copy")


def run_fused(cases, threads, rounds, with_compile=True):
    """{case key: {contender: median seconds, contender + "/fused": median over the rounds of its time over the
    fused kernel's in the same round}} and {case key: {contender: why skipped}}."""
    figures, skipped = {}, {}
    settle = settle_seconds([threads])
    with thread_settings_kept():
        for case in cases:
            bench = FusedBench(case, np.random.default_rng(0))
            factories = {"fused": bench.fused, "unfused": bench.unfused, "torch": bench.torch_eager,
                         "torch.compile": bench.torch_compiled if with_compile else None}
            contenders, notes = [], {}
            for name, factory in factories.items():
                if factory is None:
                    notes[name] = "not asked for"
                    continue
                try:
                    contenders.append(Contender(name, threads, factory(threads)))
                except Unavailable as error:
                    notes[name] = str(error)
            destination = np.empty_like(bench.x)
            contenders.append(Contender("copy", threads, lambda: parallel_copy(destination, bench.x, threads)))
            samples = measure(contenders, rounds, warmup=2, settle=settle)
            figures[case.key] = {c.name: samples[c.key].summary()["median"] for c in contenders}
            fused_samples = samples.get(Contender("fused", threads, None).key)
            for c in contenders:
                if fused_samples is not None and c.name != "fused":
                    figures[case.key][c.name + "/fused"] = paired_ratio(samples[c.key], fused_samples)["median"]
            skipped[case.key] = notes
    return figures, skipped


def markdown(figures, skipped, cases, threads):
    """The times table: milliseconds, and each contender's time over the fused kernel's (paired by round)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = ["%d threads, median of the rounds; load average at the end %s" % (
        threads, ", ".join("%.2f" % v for v in load) if load else "unknown"), "",
             "| kernel | shape | fused ms | copy ms | unfused ms (x fused) | torch ms (x fused) | "
             "torch.compile ms (x fused) |", "|---|---|--:|--:|--:|--:|--:|"]
    for case in cases:
        f = figures.get(case.key)
        if f is None:
            continue
        cells = []
        for name in ("unfused", "torch", "torch.compile"):
            if name in f:
                cells.append("%.2f (%.2fx)" % (f[name] * 1e3, f[name + "/fused"]))
            else:
                cells.append("skipped: %s" % skipped[case.key].get(name, "?"))
        lines.append("| %s | %s | %.2f | %.2f | %s |" % (case.label, case.shape_label, f["fused"] * 1e3,
                                                           f["copy"] * 1e3, " | ".join(cells)))
    return "\n".join(lines)


def add_arguments(parser):
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="relu and the residual kernels, 9 rounds")
    mode.add_argument("--smoke", action="store_true", help="two tiny cases, 2 rounds, no torch.compile")
    parser.add_argument("--threads", type=int, default=2, help="threads of every contender (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 25; 9 quick; 2 smoke)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles each case)")
    parser.add_argument("--counts", action="store_true", help="also the valgrind counts (FUSED_COUNT_CASES)")


def main(args):
    cases = SMOKE_FUSED_CASES if args.smoke else QUICK_FUSED_CASES if args.quick else FUSED_CASES
    rounds = args.rounds or (2 if args.smoke else 9 if args.quick else 25)
    figures, skipped = run_fused(cases, args.threads, rounds, with_compile=not (args.no_compile or args.smoke))
    print(markdown(figures, skipped, cases, args.threads))
    if args.counts:
        from . import counts

        try:
            count_figures, count_skipped = counts.run_counts(counts.REPO, FUSED_COUNT_CASES)
        except counts.CountsUnavailable as error:
            print("benchmarks fused: %s" % error)
            return 2
        print()
        print(counts.markdown(count_figures, count_skipped, FUSED_COUNT_CASES))
    return 0
