"""IR < 4 models (every initializer also listed as a graph input, a declaration) fold without growing:
the initializers the fold replaces go, declarations included, and nothing is stored twice."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from foldnorm.cli import main
from foldnorm.fold import fold_model
from foldnorm.fold.io.modelio import save_model
from tests.fold.fold_models import ModelBuilder, count_ops, run_ort


def declare_initializers(model, ir_version=3):
    """The model as IR < 4 writes it: each initializer also a graph input, after the real inputs."""
    model.ir_version = ir_version
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return model


def conv_bn_chain(pairs=3, channels=32, seed=0, opset=9):
    """x -> (Conv 3x3 -> BN -> Relu) * pairs, with weights large enough that a copy would show in the size."""
    b = ModelBuilder(seed)
    x = b.input("x", [1, channels, 8, 8])
    for i in range(pairs):
        y = b.conv(x, channels, channels, 3, bias=i % 2 == 0, name="conv%d" % i)
        x = b.relu(b.frozen_batch_norm(y, channels, name="bn%d" % i))
    b.output(x, [1, channels, 8, 8])
    return declare_initializers(b.model(opset=opset))


def feeds_for(model, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((1, 32, 8, 8)).astype(np.float32)}


def initializer_bytes(model):
    return sum(len(t.raw_data) for t in model.graph.initializer) + sum(
        len(a.t.raw_data) for n in model.graph.node for a in n.attribute if a.HasField("t"))


@pytest.mark.parametrize("opset", [7, 9, 13])
def test_an_ir3_model_folds_without_growing_and_matches_onnxruntime(tmp_path, opset):
    model = conv_bn_chain(opset=opset)
    source = tmp_path / "model.onnx"
    source.write_bytes(model.SerializeToString())
    folded, report = fold_model(source, verify=True)
    assert report.verification.passed
    assert count_ops(folded, "BatchNormalization") == 0
    assert folded.ir_version == 3  # never bumped
    onnx.checker.check_model(folded, full_check=True)

    save_model(folded, tmp_path / "out.onnx")
    size_before, size_after = source.stat().st_size, (tmp_path / "out.onnx").stat().st_size
    # The folded weights replace the old ones (and the BN parameters go): smaller, never larger.
    assert size_after < size_before
    assert initializer_bytes(folded) <= initializer_bytes(model)
    conv_weights = 3 * 32 * 32 * 9 * 4
    assert initializer_bytes(folded) >= conv_weights  # each weight once, not zero times either

    feeds = feeds_for(model)
    expected = run_ort(model, feeds)[model.graph.output[0].name]
    got = run_ort(onnx.load(str(tmp_path / "out.onnx")), feeds)[model.graph.output[0].name]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_every_initializer_left_is_still_declared_and_every_declaration_left_names_one_or_an_input():
    model = conv_bn_chain()
    folded, _ = fold_model(model, verify=False)
    inputs = [i.name for i in folded.graph.input]
    initializers = {t.name for t in folded.graph.initializer}
    assert initializers <= set(inputs)
    assert inputs[0] == "x" and set(inputs[1:]) <= initializers
    read = {name for node in folded.graph.node for name in node.input}
    assert initializers <= read  # nothing left behind unread


def test_initializers_the_model_itself_left_unread_stay():
    model = conv_bn_chain(pairs=1)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(300, dtype=np.float32), "unused"))
    model.graph.input.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [300]))
    folded, _ = fold_model(model, verify=False)
    assert "unused" in {t.name for t in folded.graph.initializer}
    assert "unused" in {i.name for i in folded.graph.input}


def test_a_weight_another_node_reads_stays_with_its_declaration():
    model = conv_bn_chain(pairs=1)
    # A second reader of the first conv's weight: the weight must stay (the fold writes a new one).
    shape_reader = helper.make_node("Shape", ["conv0.weight"], ["weight_shape"])
    model.graph.node.append(shape_reader)
    model.graph.output.append(helper.make_tensor_value_info("weight_shape", TensorProto.INT64, [4]))
    folded, _ = fold_model(model, verify=False)
    assert "conv0.weight" in {t.name for t in folded.graph.initializer}
    assert "conv0.weight" in {i.name for i in folded.graph.input}
    feeds = feeds_for(model)
    np.testing.assert_array_equal(run_ort(folded, feeds)["weight_shape"], [32, 32, 3, 3])


def test_a_weight_a_subgraph_reads_stays():
    model = conv_bn_chain(pairs=1)
    output = model.graph.output[0].name
    then_branch = helper.make_graph([helper.make_node("Shape", ["bn0.scale"], ["branch"])], "then", [],
                                    [helper.make_tensor_value_info("branch", TensorProto.INT64, [1])])
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    model.graph.node.append(helper.make_node("If", ["cond"], ["scale_shape"], then_branch=then_branch,
                                             else_branch=then_branch))
    model.graph.output.append(helper.make_tensor_value_info("scale_shape", TensorProto.INT64, [1]))
    folded, report = fold_model(model, verify=False)
    assert "bn0.scale" in {t.name for t in folded.graph.initializer}
    assert output in {o.name for o in folded.graph.output}


def test_the_command_line_writes_an_ir3_model_no_larger_than_its_input(tmp_path, capsys):
    source = tmp_path / "model.onnx"
    source.write_bytes(conv_bn_chain().SerializeToString())
    assert main(["fold", str(source), "-o", str(tmp_path / "out.onnx")]) == 0, capsys.readouterr().err
    assert (tmp_path / "out.onnx").stat().st_size < source.stat().st_size
    assert onnx.load(str(tmp_path / "out.onnx")).ir_version == 3
