#!/usr/bin/env bash
# The pull-request benchmark check, runnable anywhere: builds this clone (make install), compares the
# working tree with BASE on this machine (python -m benchmarks ab), and leaves ab.md, ab.json and
# ab_ratios.png in OUT. In GitHub Actions it also appends ab.md to the job summary.
#
#   benchmarks/ci.sh [BASE]      BASE: a git ref (default: $BENCH_BASE, else origin/$GITHUB_BASE_REF, else HEAD~1)
#   BENCH_OUT=DIR                where the files go (default: benchmarks/results/ab)
#   BENCH_ARGS="--rounds 30"     more options for `python -m benchmarks ab`
#
# Exit code: that of the comparison: 0 no slowdown, 1 a slowdown flagged, 2 the comparison could not be made.
set -uo pipefail
cd "$(dirname "$0")/.."

base="${1:-${BENCH_BASE:-}}"
if [ -z "$base" ]; then
	if [ -n "${GITHUB_BASE_REF:-}" ]; then base="origin/$GITHUB_BASE_REF"; else base="HEAD~1"; fi
fi
out="${BENCH_OUT:-benchmarks/results/ab}"

if ! make install; then
	echo "benchmarks/ci.sh: the working tree does not build" >&2
	exit 2
fi
# shellcheck disable=SC2086
.venv/bin/python -m benchmarks ab --base "$base" --out "$out" ${BENCH_ARGS:-}
status=$?
if [ -n "${GITHUB_STEP_SUMMARY:-}" ] && [ -f "$out/ab.md" ]; then
	cat "$out/ab.md" >> "$GITHUB_STEP_SUMMARY"
fi
exit $status
