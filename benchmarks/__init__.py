"""foldnorm's benchmarks: kernels against a copy of the same size, NumPy, onnxruntime and torch; models
before and after folding. Run as `python -m benchmarks run [--quick]` and `python -m benchmarks compare`."""
