"""What the fold keeps exactly (IR version, opsets, producer, metadata, doc strings, graph inputs/outputs,
valid value_info), what it removes (unused initializers, nodes and value_info), the full checker, the
report, and the built-in verification."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldnorm.fold.core import absorb
from foldnorm.fold.errors import VerificationError
from foldnorm.fold import fold_model, inspect_model
from foldnorm.fold.core.graph_index import GraphIndex, NameScope
from tests.fold.fold_models import ModelBuilder, conv_bn_model, count_ops, fold_and_compare


def decorated_model():
    """Conv -> BN -> Relu -> BN(rewritten) with metadata, doc strings and value_info on every value."""
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    b.node("Conv", [x, b.weight("w", [4, 3, 3, 3])], ["c"], name="conv", doc_string="the conv")
    b.batch_norm("c", "n", 4, name="bn1")
    b.node("Relu", ["n"], ["r"], name="relu", doc_string="the relu")
    b.batch_norm("r", "y", 4, name="bn2")
    b.output("y", [2, 4, 3, 3])
    b.inputs.append(helper.make_tensor_value_info("unused_input", TensorProto.FLOAT, [1]))
    b.value_info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 4, 3, 3]) for name in ("c", "n", "r")]
    model = b.model(opset=13)
    model.producer_name, model.producer_version = "a-trainer", "9.9"
    model.doc_string = "model doc"
    model.graph.doc_string = "graph doc"
    model.domain, model.model_version = "org.example", 7
    helper.set_model_props(model, {"author": "someone", "license": "MIT"})
    return model


def test_model_level_fields_are_kept_exactly():
    model = decorated_model()
    folded, report, error = fold_and_compare(model, {"x": np.random.default_rng(0).standard_normal((2, 3, 5, 5))
                                                     .astype(np.float32), "unused_input": np.zeros(1, np.float32)})
    for field in ("ir_version", "producer_name", "producer_version", "doc_string", "domain", "model_version"):
        assert getattr(folded, field) == getattr(model, field), field
    assert list(folded.opset_import) == list(model.opset_import)
    assert list(folded.metadata_props) == list(model.metadata_props)
    assert folded.graph.doc_string == "graph doc" and folded.graph.name == model.graph.name
    assert list(folded.graph.input) == list(model.graph.input)
    assert list(folded.graph.output) == list(model.graph.output)
    relu = [n for n in folded.graph.node if n.op_type == "Relu"][0]
    assert relu.doc_string == "the relu"
    assert error < 2e-6


def test_value_info_of_values_that_vanished_is_dropped_and_the_rest_kept():
    model = decorated_model()
    folded, _ = fold_model(model, verify=False)
    onnx.checker.check_model(folded, full_check=True)
    # "c" (the conv output) vanished: the conv now writes "n"; "n" and "r" are still there, same shape
    assert [v.name for v in folded.graph.value_info] == ["n", "r"]
    assert list(folded.graph.value_info) == list(model.graph.value_info)[1:]


def test_unused_initializers_and_constant_nodes_are_removed_but_graph_inputs_stay():
    model = decorated_model()
    folded, _ = fold_model(model, verify=False, rewrite_bn=True)
    names = {t.name for t in folded.graph.initializer}
    assert not names & {"w", "n_scale", "n_bias", "n_mean", "n_var", "y_scale", "y_var"}
    assert len(folded.graph.initializer) == 4  # new conv weight and bias, new Mul and Add constants
    assert "unused_input" in [i.name for i in folded.graph.input]


def test_unused_nodes_the_model_had_before_are_not_touched():
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Relu", ["x"], ["dangling"], name="dangling"))
    folded, _ = fold_model(model, verify=False)
    assert [n.name for n in folded.graph.node] == ["conv", "dangling"]


def test_fresh_names_never_collide_with_existing_ones():
    model = conv_bn_model()
    # a value already named like the generated weight name
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "conv_folded_weight"))
    model.graph.node.append(helper.make_node("Identity", ["conv_folded_weight"], ["extra"]))
    model.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    folded, report, error = fold_and_compare(model)
    names = [t.name for t in folded.graph.initializer]
    assert len(names) == len(set(names)) == 3
    assert folded.graph.node[0].input[1] == "conv_folded_weight_1"
    assert error < 2e-6


def test_report_counts_text_and_json():
    model = decorated_model()
    folded, report = fold_model(model, verify=False, rewrite_bn=True)
    assert report.counts() == {"normalizations": 2, "found": {"BatchNormalization": 2},
                               "folded": {"Conv": 1}, "rewritten": 1, "left": 0}
    assert report.nodes_before == 4 and report.nodes_after == 4  # Conv, Relu, Mul, Add
    assert report.param_bytes_before == (4 * 3 * 9 + 8 * 4) * 4
    assert report.param_bytes_after == (4 * 3 * 9 + 4 + 4 + 4) * 4
    text = report.format_text()
    assert "normalizations found: 2 BatchNormalization" in text
    assert "folded: 1 (Conv 1)" in text and "rewritten to Mul/Add: 1" in text
    assert "nodes: 4 -> 4" in text and "parameter bytes: 560 -> 480" in text
    detailed = report.format_text(every_node=True)
    assert "bn2 (BatchNormalization): rewritten" in detailed and "Relu 'relu'" in detailed
    data = json.loads(json.dumps(report.to_dict()))
    assert data["counts"]["rewritten"] == 1
    assert [o["node"] for o in data["outcomes"]] == ["bn1", "bn2"]
    assert data["verification"] is None


def test_left_nodes_are_listed_with_their_reason():
    b = ModelBuilder()
    x = b.input("x", [2, 3, 5, 5])
    b.node("BatchNormalization", [x] + b.batch_norm_params("bn", 3), ["y", "rm", "rv"], name="train_bn",
           training_mode=1)
    b.output("y", [2, 3, 5, 5])
    _, report = fold_model(b.model(), verify=False)
    text = report.format_text()
    assert "left: 1" in text and "train_bn (BatchNormalization): left: training_mode=1" in text


def test_unnamed_nodes_get_stable_generated_names():
    model = conv_bn_model()
    for node in model.graph.node:
        node.name = ""
    folded, report = fold_model(model, verify=False)
    assert [o.node for o in report.outcomes] == ["BatchNormalization#1"]
    assert "Conv 'Conv#0'" in report.outcomes[0].reason


def test_built_in_verification_passes_and_is_reported():
    folded, report = fold_model(conv_bn_model(), verify=True)
    assert report.verification.passed
    assert report.verification.outputs[0].max_abs_error < 1e-4
    assert "verification against onnxruntime" in report.format_text()


def test_verification_failure_raises_with_the_report(monkeypatch):
    real = absorb.fold_into_conv

    def wrong_fold(weight, bias, affine, group):
        new_weight, new_bias = real(weight, bias, affine, group)
        return new_weight, new_bias + 1.0

    monkeypatch.setattr(absorb, "fold_into_conv", wrong_fold)
    with pytest.raises(VerificationError, match="'y'") as caught:
        fold_model(conv_bn_model(), verify=True)
    assert caught.value.report.verification.passed is False


def test_inspect_reports_without_verification_and_never_changes_the_model():
    model = decorated_model()
    before = model.SerializeToString()
    report = inspect_model(model, rewrite_bn=True)
    assert model.SerializeToString() == before
    assert report.verification is None
    assert [(o.node, o.action) for o in report.outcomes] == [("bn1", "folded"), ("bn2", "rewritten")]
    assert [o.action for o in inspect_model(model).outcomes] == ["folded", "left"]


def test_fold_model_accepts_a_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn_model(), str(path))
    folded, report = fold_model(str(path), verify=False)
    assert report.model == str(path)
    assert count_ops(folded, "BatchNormalization") == 0


def test_graph_index_tracks_readers_inside_subgraphs():
    then_graph = helper.make_graph([helper.make_node("Relu", ["outer"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["outer"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["outer"], name="producer"),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph, name="if"),
         helper.make_node("Abs", ["outer"], ["z"], name="abs")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    index = GraphIndex(model.graph, path="main", names=NameScope(model), opset=15,
                       inputs_are_constant=False, constants_as_nodes=False)
    assert sorted(index.label(n) for n in index.readers("outer")) == ["abs", "if", "if"]
    assert index.only_reader("outer") is None
    assert index.producer["outer"].name == "producer"
