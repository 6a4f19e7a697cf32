"""The figures of README.md and benchmarks/README.md, made from one run of record.

    make figures                                    a full run, then the command below on its results
    python -m benchmarks figures [RESULTS.json]

With RESULTS.json (what `python -m benchmarks run` writes), that run becomes the run of record: it is
copied to benchmarks/record/results.json. Without it, the committed run of record is used again. From
the run of record come the PNGs in benchmarks/figures/ and the part of each README between its two
markers; nothing else in the READMEs is touched. The run names the foldnorm version and the machine it
measured; tests/benchmarks/test_run_of_record.py fails when that version is not the package's, or when a
README's part is not what this command makes of the run of record.
"""
import json
import os
import shutil
import sys

from . import report
from .machine import banner

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RECORD = os.path.join(HERE, "record", "results.json")
FIGURES = os.path.join(HERE, "figures")
BEGIN = "<!-- run of record: begin (made by `python -m benchmarks figures`; edit benchmarks/figures.py instead) -->"
END = "<!-- run of record: end -->"
READMES = (("README.md", "benchmarks/figures/"), ("benchmarks/README.md", "figures/"))


def add_arguments(parser):
    parser.add_argument("results", nargs="?",
                        help="a results.json of `python -m benchmarks run` to adopt as the run of record "
                        "(default: the committed benchmarks/record/results.json)")


def load(path=RECORD):
    with open(path) as f:
        return json.load(f)


def machine_sentence(results):
    """Which foldnorm, which run, which machine: the first line of every generated part."""
    machine = results["machine"]
    copy = ", ".join("%.1f GB/s on %s thread%s" % (g, t, "" if t == "1" else "s") for t, g in machine["copy_gbps"].items())
    return ("Run of record: foldnorm %s, a %s run of %s UTC on %s, %d usable cores (%s), host %r; the memory "
            "copy, the roof, moved %s." % (
                machine["versions"]["foldnorm"], results["mode"], machine["date"][:16].replace("T", " "),
                machine["cpu_model"], machine["usable_cores"], report.topology_text(machine.get("topology", {})),
                machine.get("host", "?"), copy))


def readme_part(results, figures_path):
    """The generated part of README.md: the run, its headline tables and the bandwidth plot."""
    lines = [machine_sentence(results) + " Float32, medians of %d runs, every ratio paired round by round in "
             "one process; [benchmarks/README.md](benchmarks/README.md#results) has the whole run." %
             results["config"]["repeats"], ""]
    lines += banner(results.get("machine_check") or {"busy": False})
    lines += report.headline(results["kernels"], results["models"])
    lines += _images(results, figures_path)[:1]
    return lines


def benchmarks_readme_part(results, figures_path):
    """The generated part of benchmarks/README.md: the plots, then the whole run as `run` prints it."""
    return [machine_sentence(results), ""] + _images(results, figures_path) + [report.markdown(results)]


def _images(results, figures_path):
    titles = {"kernels_gbps.png": "GB/s against the copy roof, with the peers",
              "thread_scaling.png": "Speed-up over one thread against the copy's",
              "model_latency.png": "Model latency after folding, relative to the original"}
    return ["![%s](%s%s)" % (titles[name], figures_path, name) for name in report.plot_names(results)] + [""]


def replace_part(text, part, path):
    """text with what lies between BEGIN and END replaced by part."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError("%s has no `%s` ... `%s` markers" % (path, BEGIN, END))
    return text[:start + len(BEGIN)] + "\n" + part.rstrip("\n") + "\n" + text[end:]


def generated_parts(results):
    """{README path relative to the repository: its generated part}."""
    makers = {"README.md": readme_part, "benchmarks/README.md": benchmarks_readme_part}
    return {path: "\n".join(makers[path](results, figures_path)) for path, figures_path in READMES}


def main(args):
    if args.results:
        try:
            adopted = load(args.results)
            machine = adopted["machine"]
            missing = [key for key in ("date", "cpu_model", "versions") if key not in machine]
        except (OSError, ValueError, KeyError, TypeError) as error:
            print("benchmarks figures: %s is not a results.json of `python -m benchmarks run` (%s)"
                  % (args.results, error), file=sys.stderr)
            return 2
        if missing or not adopted.get("kernels"):
            print("benchmarks figures: %s lacks %s" % (args.results, ", ".join(missing) or "kernel results"),
                  file=sys.stderr)
            return 2
        os.makedirs(os.path.dirname(RECORD), exist_ok=True)
        if os.path.abspath(args.results) != RECORD:
            shutil.copyfile(args.results, RECORD)
    results = load()
    paths, note = report.plot(results, FIGURES)
    if note:
        print("benchmarks figures: %s" % note, file=sys.stderr)
        return 2
    for path, part in generated_parts(results).items():
        full = os.path.join(REPO, path)
        with open(full) as f:
            text = f.read()
        with open(full, "w") as f:
            f.write(replace_part(text, part, path))
    print("benchmarks figures: from the run of record (foldnorm %s, %s, %s%s) wrote %s, README.md and "
          "benchmarks/README.md" % (results["machine"]["versions"]["foldnorm"], results["machine"]["date"],
                                    results["machine"]["cpu_model"],
                                    ", BUSY MACHINE" if (results.get("machine_check") or {}).get("busy") else "",
                                    ", ".join(os.path.relpath(p, REPO) for p in paths)))
    return 0
