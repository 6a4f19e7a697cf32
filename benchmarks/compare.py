"""`python -m benchmarks compare OLD.json NEW.json`: per-figure ratios new/old, slowdowns flagged.

Every figure in the results' `figures` is lower-is-better (a time, or a time ratio taken within one
run), so a ratio above 1 + threshold is a slowdown. Exit code: 0 none flagged, 1 some flagged, 2 an input
file that cannot be read as benchmark results.
"""
import json
import sys


class BadResults(Exception):
    pass


def load_figures(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as error:
        raise BadResults("cannot read %s: %s" % (path, error.strerror or error)) from None
    except ValueError as error:
        raise BadResults("%s is not JSON: %s" % (path, error)) from None
    figures = data.get("figures") if isinstance(data, dict) else None
    if not isinstance(figures, dict):
        raise BadResults("%s has no 'figures' object: not a benchmarks results file" % path)
    values = {}
    for name, figure in figures.items():
        value = figure.get("value") if isinstance(figure, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise BadResults("%s: figure %r has no positive number 'value'" % (path, name))
        values[name] = float(value)
    return values


def compare(old, new, threshold):
    """Rows (name, old, new, ratio, flagged) for the figures in both, and the names in only one."""
    rows = []
    for name in sorted(set(old) & set(new)):
        ratio = new[name] / old[name]
        rows.append((name, old[name], new[name], ratio, ratio > 1 + threshold))
    return rows, sorted(set(old) - set(new)), sorted(set(new) - set(old))


def format_table(rows, only_old, only_new, threshold):
    lines = ["| figure | old | new | new/old | |", "|---|--:|--:|--:|---|"]
    for name, old, new, ratio, flagged in rows:
        lines.append("| %s | %.4g | %.4g | %.3f | %s |" % (
            name, old, new, ratio, "SLOWER (> %.0f%%)" % (threshold * 100) if flagged else ""))
    flagged = sum(1 for row in rows if row[4])
    lines.append("")
    lines.append("%d figures compared, %d slower by more than %.0f%%." % (len(rows), flagged, threshold * 100))
    for which, names in (("OLD", only_old), ("NEW", only_new)):
        if names:
            lines.append("Only in %s (not compared): %s" % (which, _some(names)))
    return "\n".join(lines)


def _some(names, shown=4):
    if len(names) <= shown:
        return ", ".join(names)
    return "%s and %d more" % (", ".join(names[:shown]), len(names) - shown)


def main(old_path, new_path, threshold):
    try:
        old = load_figures(old_path)
        new = load_figures(new_path)
    except BadResults as error:
        print("benchmarks compare: %s" % error, file=sys.stderr)
        return 2
    rows, only_old, only_new = compare(old, new, threshold)
    print(format_table(rows, only_old, only_new, threshold))
    return 1 if any(row[4] for row in rows) else 0
