"""The corpus benchmark times the three variants of a model, and the variants compute the same thing."""
import numpy as np
import onnxruntime as ort

from benchmarks import corpus


def test_the_corpus_benchmark_times_three_equivalent_variants(tmp_path):
    (name, path, shape), = corpus.corpus_models(str(tmp_path), only=["light_shufflenet"])
    paths, counts = corpus.variants(path, str(tmp_path))
    assert counts["folded"] and counts["left"] == 0
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    outputs = {}
    for variant, variant_path in paths.items():
        session = corpus.session(variant_path, "disabled")
        outputs[variant] = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)
        assert session.get_session_options().intra_op_num_threads == 1
    scale = np.abs(outputs["original"]).max()
    for variant in ("folded", "onnxruntime"):
        assert np.abs(outputs[variant] - outputs["original"]).max() <= 1e-4 * scale
    timings = corpus.time_model(paths, shape, rounds=2, repeat=1)
    assert set(timings) == set(corpus.LEVELS)
    for level in corpus.LEVELS:
        assert {variant: len(seconds) for variant, seconds in timings[level].items()} == dict.fromkeys(paths, 2)
    assert ort.GraphOptimizationLevel.ORT_DISABLE_ALL == corpus.session(paths["original"], "disabled") \
        .get_session_options().graph_optimization_level
