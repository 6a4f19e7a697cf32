#!/usr/bin/env bash
# Proves what `make wheel` left in DIST: exactly one manylinux wheel and one sdist.
#
#   tools/check_dist.sh PYTHON DIST      PYTHON: the interpreter to make the fresh venv with
#
# The sdist: holds what a build, the tests, the benchmarks and the README's examples need (the wheel
# beside it was built from it). The wheel: no sources, its libgomp inside; installed into a fresh venv
# with nothing but that venv on PATH (no compiler) and the system's libgomp out of the loader's reach,
# it must load the bundled libgomp, run a kernel against a float64 reference, its docstring examples,
# the demo, and the sdist's example, all from a folder outside this checkout.
#
# Hiding the system's libgomp: where the kernel lets this user make a mount namespace (root, or
# unprivileged user namespaces), every libgomp the loader knows of is covered by an empty file there, and
# the script first checks that loading it fails. Everywhere, LD_DEBUG shows which libgomp was loaded:
# only the wheel's own copy may be.
set -euo pipefail

python=${1:?usage: tools/check_dist.sh PYTHON DIST}
dist=${2:?usage: tools/check_dist.sh PYTHON DIST}
fail() { echo "check_dist: $*" >&2; exit 1; }
say() { echo "check_dist: $*"; }

shopt -s nullglob
wheels=("$dist"/*.whl)
sdists=("$dist"/*.tar.gz)
everything=("$dist"/*)
[ ${#wheels[@]} -eq 1 ] && [ ${#sdists[@]} -eq 1 ] && [ ${#everything[@]} -eq 2 ] ||
	fail "$dist must hold one wheel and one sdist, and nothing else; it holds: ${everything[*]:-nothing}"
wheel=$(realpath "${wheels[0]}")
sdist=$(realpath "${sdists[0]}")
case "$(basename "$wheel")" in
*manylinux*) ;;
*) fail "$(basename "$wheel") is not a manylinux wheel (auditwheel repair makes one)" ;;
esac

# The wheel: compiled modules and Python code; no C or Cython sources; libgomp inside.
listing=$(unzip -Z1 "$wheel")
if grep -E '\.(c|pyx|pxd|h)$' <<<"$listing"; then fail "the wheel ships sources"; fi
grep -qE '^foldnorm\.libs/libgomp-[^/]*\.so' <<<"$listing" || fail "the wheel has no libgomp of its own (foldnorm.libs/)"
say "wheel $(basename "$wheel"): no sources, bundles $(grep -E '^foldnorm\.libs/.' <<<"$listing" | tr '\n' ' ')"

# The sdist: the build's sources, the tests, the benchmarks, the examples and the files the README names.
contents=$(tar -tzf "$sdist" | sed 's|^[^/]*/||')
for needed in pyproject.toml setup.py MANIFEST.in README.md CHANGELOG.md LICENSE Makefile tools/check_dist.sh \
	src_c/batch_norm.c foldnorm/kernels/_kernels.pxd foldnorm/kernels/_batch_norm.pyx foldnorm/py.typed \
	tests/test_cli.py benchmarks/__main__.py benchmarks/ci.sh examples/sync_batch_norm_training.py; do
	grep -qxF "$needed" <<<"$contents" || fail "the sdist lacks $needed"
done
if grep -E '(^|/)(__pycache__|results)/|\.so$' <<<"$contents"; then fail "the sdist holds build or run outputs"; fi
say "sdist $(basename "$sdist"): $(wc -l <<<"$contents") files, examples, tests and benchmarks included"

scratch=$(mktemp -d /tmp/foldnorm-dist-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
"$python" -m venv "$scratch/venv"
tar -xzf "$sdist" -C "$scratch"
example=$(echo "$scratch"/foldnorm-*/examples/sync_batch_norm_training.py)

# What runs in the venv has nothing but the venv on PATH, so no compiler can be found; pip takes binary
# wheels only.
venv_env=(env PATH="$scratch/venv/bin" CC=/nonexistent CXX=/nonexistent)
in_venv() { "${venv_env[@]}" "$@"; }
in_venv pip --disable-pip-version-check install -q --only-binary :all: "$wheel" pytest
for compiler in cc gcc clang; do
	if in_venv /bin/sh -c "command -v $compiler" >/dev/null; then fail "a compiler ($compiler) is on the venv's PATH"; fi
done

# The libgomp files the loader could find on this system.
system_libgomp=$(PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | awk '/libgomp/ {print $NF}' | xargs -r -n1 realpath | sort -u | tr '\n' ' ')
export HIDE="$system_libgomp"
if [ -n "$system_libgomp" ] && unshare -rm true 2>/dev/null; then
	# shellcheck disable=SC2016
	hidden() { unshare -rm bash -c 'for lib in $HIDE; do mount --bind /dev/null "$lib"; done; exec "$@"' hidden \
		"${venv_env[@]}" "$@"; }
	if hidden python -c "import ctypes; ctypes.CDLL('libgomp.so.1')" 2>/dev/null; then
		fail "the system's libgomp could still be loaded where it should be hidden"
	fi
	say "the system's libgomp ($system_libgomp) is hidden: loading it fails in the checks below"
else
	hidden() { in_venv "$@"; }
	say "no mount namespace here (or no system libgomp): the checks rely on LD_DEBUG to show which libgomp loads"
fi

cd "$scratch"
loaded=$(LD_DEBUG=libs hidden python -c "import foldnorm.kernels" 2>&1 | awk '/calling init: .*libgomp/ {print $NF}' |
	xargs -r -n1 realpath | sort -u)
[ -n "$loaded" ] || fail "no libgomp was loaded with the kernels (a build without OpenMP?)"
site=$(realpath "$(in_venv python -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")")
for lib in $loaded; do
	case "$lib" in "$site"/foldnorm.libs/*) ;; *) fail "the kernels loaded $lib, not the wheel's own libgomp" ;; esac
done
say "the kernels load the wheel's libgomp: $loaded"

hidden foldnorm --version
hidden python - <<'PY'
import numpy as np

import foldnorm

info = foldnorm.build_info()
assert info["openmp"], info
# The target_clones dispatch: a compiler too old for it (GCC < 12) leaves the baseline loops alone.
if "vector_paths" in info:
    assert "x86-64-v3" in info["vector_paths"].split(","), info
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 8, 16, 16)).astype(np.float32)
mean, var, w, b = rng.standard_normal(8), rng.uniform(0.5, 2, 8), rng.standard_normal(8), rng.standard_normal(8)
y = foldnorm.batch_norm(x, mean, var, w, b, eps=1e-5, num_threads=2)
shape = (1, 8, 1, 1)
reference = (x.astype(np.float64) - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5) * w.reshape(shape) \
    + b.reshape(shape)
error = float(np.max(np.abs(y - reference)) / np.max(np.abs(reference)))
assert error < 1e-6, error
print("check_dist: batch_norm on 2 threads within %.1e of float64; build: %s" % (error, info))
PY
hidden python -m pytest -q -p no:cacheprovider --doctest-modules --pyargs foldnorm
hidden foldnorm demo --quick
hidden python "$example" --single --steps 20
say "$(basename "$wheel") and $(basename "$sdist") hold up"
