# foldnorm: every target sets itself up from a fresh clone (a .venv beside this file).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
SOURCES := pyproject.toml setup.py $(wildcard src_c/*.c src_c/*.h foldnorm/kernels/*.pyx foldnorm/kernels/*.pxd)

.PHONY: all install demo test asan lint-c bench bench-quick wheel clean

all: test

# The build requirements live in the venv too: `make asan` and in-place rebuilds compile without isolation.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel 'Cython>=3.0'

# The package with its test and benchmark extras, built with OpenMP required. torch is an optional peer:
# installed only when a local CPU wheel of the pinned release is available (a plain download would be a
# multi-GB CUDA build); tests and benchmarks that compare with it are skipped without it.
$(VENV)/.installed: $(PY) $(SOURCES)
	FOLDNORM_REQUIRE_OPENMP=1 $(PIP) install -q -e '.[test,bench,mpi]'
	@if $(PIP) download -q --no-index --no-deps -d $(VENV)/.torch-probe torch==2.13.0 >/dev/null 2>&1; then \
		$(PIP) install -q torch==2.13.0 || echo "foldnorm: torch could not be installed; torch comparisons are skipped"; \
	else echo "foldnorm: no local torch==2.13.0 CPU wheel; torch comparisons are skipped"; fi
	@rm -rf $(VENV)/.torch-probe
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/foldnorm demo

# The C sources without a warning at -Wall -Wextra, with OpenMP and without; optimized too, since some
# warnings (values maybe used uninitialized) only appear then; and every header compiles on its own, but for
# the type-generic ones that fn_instantiate.h includes.
LINT_C := gcc -std=c11 -Wall -Wextra -Werror -Isrc_c

lint-c:
	$(LINT_C) -fsyntax-only -fopenmp src_c/*.c
	$(LINT_C) -fsyntax-only -Wno-unknown-pragmas src_c/*.c
	@for f in src_c/*.c; do $(LINT_C) -O2 -fopenmp -c -o /dev/null $$f || exit 1; done
	@for h in $(filter-out %_impl.h src_c/fn_instantiate.h,$(wildcard src_c/*.h)); do $(LINT_C) -fsyntax-only -fopenmp -x c $$h || exit 1; done

test: install lint-c
	$(PY) -m pytest -q

# The tests that run foldnorm's C code (the kernels, and the benchmarks that call them) against kernels built
# with AddressSanitizer.  Python itself is not instrumented, so the runtime is preloaded and leak checking,
# which would report the interpreter's own, is off.  The fold tests run no C code of ours, and onnx's
# checker aborts under a preloaded ASan runtime when it throws a C++ exception, so they are left out.
ASAN_TESTS := tests/kernels tests/test_benchmarks.py

asan: install
	FOLDNORM_SANITIZE=address $(PY) setup.py -q build_ext --inplace --force
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		$(PY) -m pytest -q -x -p no:cacheprovider $(ASAN_TESTS) ; status=$$?; \
	$(PY) setup.py -q build_ext --inplace --force >/dev/null; exit $$status

bench-quick: install
	$(PY) -m benchmarks run --quick

bench: install
	$(PY) -m benchmarks run

# A wheel and an sdist into dist/, then the wheel installed into a fresh venv and imported there, away from
# this checkout and with no compiler on PATH: what a user who installs the wheel gets.
WHEEL_CHECK := $(shell mktemp -u /tmp/foldnorm-wheel-XXXXXX)

wheel: $(PY)
	rm -rf dist
	$(PIP) install -q build
	FOLDNORM_REQUIRE_OPENMP=1 $(PY) -m build -q --outdir dist .
	@if unzip -l dist/*.whl | grep -E '\.(c|pyx|pxd|h)$$'; then echo "wheel ships sources"; exit 1; fi
	$(PYTHON) -m venv $(WHEEL_CHECK)
	$(WHEEL_CHECK)/bin/pip install -q dist/*.whl
	cd /tmp && env PATH=$(WHEEL_CHECK)/bin CC=/nonexistent $(WHEEL_CHECK)/bin/python -c \
	  "import numpy as np, foldnorm; y = foldnorm.batch_norm(np.ones((2, 3, 4), np.float32), np.zeros(3), np.ones(3)); \
	   assert np.allclose(y, 1, atol=1e-4); import foldnorm.fold; print('wheel OK:', foldnorm.__version__, foldnorm.build_info()['openmp'])"
	rm -rf $(WHEEL_CHECK)
	ls -l dist

clean:
	rm -rf build dist *.egg-info foldnorm/kernels/*.so foldnorm/kernels/_*.c $(VENV)

# The working tree against BASE (a git ref), interleaved on this machine: timings with confidence intervals
# and deterministic valgrind counts. The comparison exits 1 on a flagged slowdown, 2 when it cannot be made
# (make reports either as its own failure: benchmarks/ci.sh keeps the two apart).
.PHONY: bench-compare bench-counts
BASE ?= HEAD
AB_OUT ?= benchmarks/results/ab
AB_ARGS ?=
bench-compare: install
	$(PY) -m benchmarks ab --base $(BASE) --out $(AB_OUT) $(AB_ARGS)

# Instructions and last-level-cache bytes per element of each kernel, under valgrind (deterministic).
bench-counts: install
	$(PY) -m benchmarks counts
