"""python -m benchmarks run [--quick] [--out DIR] [--threads 1,2] | compare OLD.json NEW.json [--threshold 0.10]
| under-load [--spinners 2] [--seconds 1.5] [--rounds 3] | big [--megabytes 300] [--rounds 5] [--huge]"""
import argparse
import os
import sys

from . import big_model, under_load

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
        "under-load", help="batch_norm_train latency beside torch while other processes spin"))
    big_model.add_arguments(commands.add_parser(
        "big", help="`foldnorm fold` on a 300 MB external-data model beside onnxruntime's optimizer"))
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    if args.command == "under-load":
        return under_load.main(args)
    if args.command == "big":
        return big_model.main(args)
    if args.command == "compare":
        from .compare import main as compare_main

        return compare_main(args.old, args.new, args.threshold)
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
    if args.models is not None:
        config.model_cases = [c for c in config.model_cases if c.name in args.models]
        if fold_scaling.NAME not in args.models:
            config.fold_pairs = ()
    run(config, threads, args.out, make_plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
