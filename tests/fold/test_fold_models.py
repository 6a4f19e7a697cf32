"""The light_* models shipped inside the onnx package: fold, verify against onnxruntime on the original,
count the BatchNormalization nodes left.

Their weights are computed by ConstantOfShape sub-graphs and their IR version is 3 (every initializer is
also a graph input, and a constant). Each model is loaded and folded once per module.
"""
import functools
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from foldnorm.fold import fold_model
from tests.fold.fold_models import count_ops, max_relative_error, random_feeds

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

# model: (BatchNormalization before, left as BN, rewritten to Mul/Add, folded)
EXPECTED = {
    "light_resnet50": (53, 0, 0, 53),
    "light_densenet121": (121, 0, 62, 59),
    "light_inception_v2": (69, 0, 0, 69),
    "light_shufflenet": (49, 0, 0, 49),
}


def with_relu_outputs(model):
    """A copy whose every Relu output is also a graph output. The light models' classifier weights are
    constant, so their softmax output is uniform whatever happens before it; the activations of each block
    (whose names the fold keeps) show a folding error plainly."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "Relu":
            copy.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    return copy


@functools.lru_cache(maxsize=None)
def folded(name):
    path = LIGHT / (name + ".onnx")
    if not path.exists():
        pytest.skip("%s is not shipped with this onnx" % path.name)
    model = onnx.load(str(path))
    result, report = fold_model(model, verify=True)
    feeds = random_feeds(model)
    error = max_relative_error(with_relu_outputs(model), with_relu_outputs(result), feeds)
    print("\n%s: BatchNormalization %d -> %d, max relative error over every Relu activation and the output "
          "%.3g, verify max abs error %.3g, nodes %d -> %d, fold %.2f s"
          % (name, count_ops(model, "BatchNormalization"), count_ops(result, "BatchNormalization"), error,
             max(o.max_abs_error for o in report.verification.outputs), report.nodes_before, report.nodes_after,
             report.fold_seconds))
    return model, result, report, error


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_light_model_folds_and_matches_onnxruntime(name):
    model, result, report, error = folded(name)
    before, left, rewritten, folded_count = EXPECTED[name]
    counts = report.counts()
    assert count_ops(model, "BatchNormalization") == before == counts["normalizations"]
    assert count_ops(result, "BatchNormalization") == left == counts["left"]
    assert counts["rewritten"] == rewritten
    assert sum(1 for o in report.normalizations() if o.action == "folded") == folded_count
    assert report.verification.passed
    assert error < 3e-5  # float32 rounding accumulated over up to ~120 layers
    assert report.nodes_after < report.nodes_before


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_light_model_result_passes_the_full_checker_and_keeps_its_interface(name):
    model, result, report, _ = folded(name)
    onnx.checker.check_model(result, full_check=True)
    # IR 3 declares each initializer as an input too: a folded one goes with its declaration.
    kept = {t.name for t in result.graph.initializer}
    declared = {t.name for t in model.graph.initializer}
    assert [i.name for i in result.graph.input] == [i.name for i in model.graph.input
                                                     if i.name not in declared or i.name in kept]
    assert [o.name for o in result.graph.output] == [o.name for o in model.graph.output]
    assert result.ir_version == model.ir_version == 3
    assert list(result.opset_import) == list(model.opset_import)
