"""One side of an A/B round, in its own process: `python -m benchmarks.worker --foldnorm-root DIR ...`.

The benchmark code is always the working tree's (this package); only foldnorm is taken from
`--foldnorm-root`, which goes first on sys.path before foldnorm is imported, and the worker refuses to run
when foldnorm still comes from elsewhere. Two modes:

- timing (default): every kernel case at every thread count, `--inner` calls after a warm-up, the copy of
  the same size interleaved; prints one JSON object {"figures": {name: median seconds}, "build": ...}.
- counts (`--counts`): each case's kernel once at 1 thread between two markers, for a run under
  callgrind (`counts.py`): os.getpgrp() starts a region (callgrind zeroes its counters there) and
  os.getppid() ends it (callgrind writes the region's counts); prints the cases in region order.
"""
import argparse
import json
import os
import sys


def _load_foldnorm(root):
    root = os.path.abspath(root)
    sys.path.insert(0, root)
    import foldnorm

    where = os.path.abspath(foldnorm.__file__)
    if not where.startswith(os.path.join(root, "")):
        raise SystemExit("benchmarks worker: foldnorm was imported from %s, not from %s" % (where, root))
    return foldnorm


def _bench(case):
    import numpy as np

    from .fused import BENCHES as FUSED_BENCHES
    from .kernels import BENCHES

    return {**BENCHES, **FUSED_BENCHES}[case.kernel](case, np.random.default_rng(0))


def timing(cases, threads, inner, settle, fold_pairs):
    import numpy as np

    from .harness import Contender, Unavailable, measure, parallel_copy, thread_settings_kept

    figures, skipped = {}, {}
    with thread_settings_kept():
        for case in cases:
            try:
                bench = _bench(case)
                runs = {t: bench.foldnorm(t) for t in threads}
            except Unavailable as error:
                skipped[case.key] = str(error)
                continue
            destination = np.empty_like(bench.x)
            contenders = []
            for t in threads:
                contenders.append(Contender("foldnorm", t, runs[t]))
                contenders.append(Contender("copy", t, lambda t=t: parallel_copy(destination, bench.x, t)))
            samples = measure(contenders, inner, warmup=1, settle=settle)
            for t in threads:
                figures["kernel/%s/t%d" % (case.key, t)] = samples["foldnorm@%d" % t].summary()["median"]
                figures["copy/%s/t%d" % (case.key, t)] = samples["copy@%d" % t].summary()["median"]
    if fold_pairs:
        from foldnorm import fold_model

        from .models import conv_bn_chain

        model = conv_bn_chain(fold_pairs)
        contender = Contender("fold", 1, lambda: fold_model(model, verify=False))
        samples = measure([contender], max(3, inner // 2), warmup=1, settle=settle)
        figures["fold/conv_bn_chain_%d" % fold_pairs] = samples["fold@1"].summary()["median"]
    return figures, skipped


def counts(cases):
    """Run each case's kernel once between the markers; returns the cases measured, in region order."""
    from .harness import Unavailable

    measured, skipped = [], {}
    for case in cases:
        try:
            bench = _bench(case)
            run = bench.foldnorm(1)
        except Unavailable as error:
            skipped[case.key] = str(error)
            continue
        run()  # first-call work (output buffers, dispatch) stays outside the region
        os.getpgrp()
        run()
        os.getppid()
        measured.append(case.key)
    return measured, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("--foldnorm-root", required=True)
    parser.add_argument("--cases", required=True, help="JSON list of kernel cases [kernel, shape, groups, channels_last]")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--settle", type=float, default=0.0)
    parser.add_argument("--fold-pairs", type=int, default=0)
    parser.add_argument("--counts", action="store_true")
    args = parser.parse_args(argv)
    foldnorm = _load_foldnorm(args.foldnorm_root)
    from .kernels import KernelCase

    cases = [KernelCase(kernel, tuple(shape), groups, channels_last)
             for kernel, shape, groups, channels_last in json.loads(args.cases)]
    if args.counts:
        measured, skipped = counts(cases)
        print(json.dumps({"regions": measured, "skipped": skipped}))
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    figures, skipped = timing(cases, threads, args.inner, args.settle, args.fold_pairs)
    print(json.dumps({"figures": figures, "skipped": skipped, "build": getattr(foldnorm, "build_info", dict)(),
                      "foldnorm_file": foldnorm.__file__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
