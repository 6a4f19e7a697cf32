"""foldnorm's benchmarks: kernels against a copy of the same size, NumPy, onnxruntime and torch; models
before and after folding; the working tree against a git ref with confidence intervals and valgrind counts.
Run as `python -m benchmarks run [--quick]`, `python -m benchmarks ab --base REF`, `python -m benchmarks
counts` and `python -m benchmarks compare`."""
