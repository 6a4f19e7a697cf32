"""python -m benchmarks run [--quick] [--out DIR] [--threads 1,2] | ab --base REF | counts
| compare OLD.json NEW.json [--threshold 0.10] | under-load [--spinners N] [--base-root DIR] [--smoke]
| big [--megabytes 300] [--rounds 5] [--huge] | startup [--runs 20] | figures [RESULTS.json]
| distributed [--shape 16,64,28,28] [--ranks 1,2] [--repeat 30] | fused [--quick|--smoke] [--threads 2] [--counts]
| corpus [--rounds 9] [--repeat 5]"""
import argparse
import os
import sys

from . import big_model, corpus, figures, fused, startup, under_load

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _thread_list(text):
    try:
        threads = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError("expected positive ints separated by commas, got %r" % text) from None
    if not threads or threads[0] < 1:
        raise argparse.ArgumentTypeError("expected positive ints separated by commas, got %r" % text)
    return threads


def _names(text):
    return [n.strip() for n in text.split(",") if n.strip()]


def parser():
    top = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="time the kernels and the models; write table, JSON and plots")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="headline shapes and fewer repetitions (a few minutes on 2 cores)")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                      help="tiny shapes, 2 repetitions: checks that everything runs; the numbers mean nothing")
    run.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json, results.md and the PNGs "
                     "(default: benchmarks/results)")
    run.add_argument("--threads", type=_thread_list, default=None,
                     help="thread counts, e.g. 1,4 (default: 1, 2 and foldnorm.get_num_threads())")
    run.add_argument("--kernels", type=_names, default=None,
                     help="only these kernels, e.g. batch_norm,layer_norm ('none' for no kernels)")
    run.add_argument("--models", type=_names, default=None,
                     help="only these models, e.g. resnet_like,conv_bn_chain (conv_bn_chain: the fold scaling; "
                     "'none' for no models)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    compare = commands.add_parser("compare", help="per-figure ratios NEW/OLD; exit 1 when a slowdown is flagged")
    compare.add_argument("old")
    compare.add_argument("new")
    compare.add_argument("--threshold", type=float, default=0.10,
                         help="flag figures slower by more than this fraction (default 0.10)")
    under_load.add_arguments(commands.add_parser(
        "under-load", help="the kernels' latency while other processes spin, against one thread, torch and a base; "
        "two processes sharing the cores"))
    big_model.add_arguments(commands.add_parser(
        "big", help="`foldnorm fold` on a 300 MB external-data model beside onnxruntime's optimizer"))
    corpus.add_arguments(commands.add_parser(
        "corpus", help="every corpus model in onnxruntime before and after the fold, beside onnxruntime's own"))
    figures.add_arguments(commands.add_parser(
        "figures", help="the PNGs and the READMEs' run-of-record parts, from the run of record (or adopt RESULTS.json "
        "as it)"))
    startup.add_arguments(commands.add_parser(
        "startup", help="median start-up time of `foldnorm --version`, `--help` and a usage error"))
    ab = commands.add_parser("ab", help="the working tree against a git ref, interleaved on this machine; "
                             "exit 1 on a flagged slowdown, 2 when the comparison cannot be made")
    where = ab.add_mutually_exclusive_group(required=True)
    where.add_argument("--base", help="git ref to compare against (built in a scratch folder)")
    where.add_argument("--base-root", help="an already-built foldnorm source tree to compare against")
    ab_mode = ab.add_mutually_exclusive_group()
    ab_mode.add_argument("--quick", action="store_const", const="quick", dest="mode",
                         help="headline shapes, 20 rounds (the default)")
    ab_mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                         help="tiny shapes, 3 rounds: checks that everything runs; no verdict means anything")
    ab.add_argument("--rounds", type=_positive, default=None, help="rounds (default: 20 quick, 3 smoke)")
    ab.add_argument("--threads", type=_thread_list, default=None, help="thread counts (default: 1 and all cores)")
    ab.add_argument("--kernels", type=_names, default=None, help="only these kernels, e.g. batch_norm,layer_norm")
    ab.add_argument("--threshold", type=_fraction, default=0.10,
                    help="flag timings slower by more than this fraction, when significant (default 0.10)")
    ab.add_argument("--count-threshold", type=_fraction, default=0.03,
                    help="flag deterministic counts higher by more than this fraction (default 0.03)")
    ab.add_argument("--false-alarm", type=_fraction, default=0.05,
                    help="chance that a same-code comparison flags any timing (default 0.05)")
    ab.add_argument("--no-counts", action="store_true", help="skip the valgrind counts")
    ab.add_argument("--out", default=os.path.join(DEFAULT_OUT, "ab"),
                    help="folder for ab.md, ab.json and ab_ratios.png (default: benchmarks/results/ab)")
    ab.add_argument("--no-plots", action="store_true", help="skip the PNG")
    fused.add_arguments(commands.add_parser(
        "fused", help="the fused kernels (activation, residual add) beside the unfused, torch eager and "
        "torch.compile compositions"))
    counts = commands.add_parser("counts", help="instructions and cache traffic per element of each kernel "
                                 "under valgrind (deterministic)")
    counts.add_argument("--smoke", action="store_true", help="two tiny cases")
    from . import distributed

    distributed.add_arguments(commands.add_parser(
        "distributed", help="synchronized batch norm under mpiexec: step time per rank against the kernels"))
    return top


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("expected a positive int, got %r" % text)
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("expected a fraction between 0 and 1, got %r" % text)
    return value


def main(argv=None):
    args = parser().parse_args(argv)
    if args.command == "under-load":
        return under_load.main(args)
    if args.command == "big":
        return big_model.main(args)
    if args.command == "corpus":
        return corpus.main(args)
    if args.command == "startup":
        return startup.main(args)
    if args.command == "figures":
        return figures.main(args)
    if args.command == "compare":
        from .compare import main as compare_main

        return compare_main(args.old, args.new, args.threshold)
    if args.command == "ab":
        return _ab(args)
    if args.command == "counts":
        return _counts(args)
    if args.command == "distributed":
        from . import distributed

        return distributed.run(args)
    if args.command == "fused":
        return fused.main(args)
    try:
        from .harness import default_threads
        threads = args.threads or default_threads()
    except ImportError as error:
        print("benchmarks: foldnorm is not built or not importable (%s); run `make install` first" % error,
              file=sys.stderr)
        return 2
    from . import fold_scaling
    from .runner import config_for, run

    config = config_for(args.mode or "full")
    if args.kernels is not None:
        config.kernel_cases = [c for c in config.kernel_cases if c.kernel in args.kernels]
        config.cache_kernels = tuple(k for k in config.cache_kernels if k in args.kernels)
    if args.models is not None:
        config.model_cases = [c for c in config.model_cases if c.name in args.models]
        if fold_scaling.NAME not in args.models:
            config.fold_pairs = ()
    run(config, threads, args.out, make_plots=not args.no_plots)
    return 0


def _ab(args):
    import signal

    from . import ab

    # A cancelled CI job sends SIGTERM: leave through SystemExit, so the scratch folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    try:
        results = ab.ab(base_ref=args.base, base_root=args.base_root, mode=args.mode or "quick",
                        rounds=args.rounds, threads=args.threads, kernels=args.kernels, threshold=args.threshold,
                        count_threshold=args.count_threshold, false_alarm=args.false_alarm,
                        with_counts=not args.no_counts, out_dir=args.out, make_plots=not args.no_plots)
    except ab.Unusable as error:
        print("benchmarks ab: %s" % error, file=sys.stderr)
        return 2
    from .ab_report import markdown

    print(markdown(results))
    print("benchmarks ab: wrote ab.md, ab.json%s into %s" % (
        "".join(", " + p for p in results["plots"]), args.out), file=sys.stderr)
    return results["exit_code"]


def _counts(args):
    from . import counts

    cases = counts.SMOKE_COUNT_CASES if args.smoke else counts.COUNT_CASES
    try:
        figures, skipped = counts.run_counts(counts.REPO, cases)
    except counts.CountsUnavailable as error:
        print("benchmarks counts: %s" % error, file=sys.stderr)
        return 2
    print(counts.markdown(figures, skipped, cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
