"""A model the ONNX checker rejects but onnxruntime runs is folded with a one-line warning; a folded model
always passes the checks its input passed (foldnorm.fold.io.modelio.check_model)."""
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from foldnorm.cli import main
from foldnorm.fold import fold_model, session
from foldnorm.fold.io import modelio
from foldnorm.fold.errors import FoldError
from foldnorm.fold.io.modelio import check_model
from tests.fold.fold_models import ModelBuilder, conv_bn_model, count_ops, random_feeds, run_ort


def without_output_shape(model):
    """The model with its first graph output typed but shapeless, as exporters often leave it after an If."""
    model.graph.output[0].type.tensor_type.ClearField("shape")
    return model


def if_model():
    """x -> Conv -> BN -> If(cond: Relu, else: Neg) -> y, y declared with a type and no shape."""
    b = ModelBuilder(seed=3)
    x = b.input("x", [2, 4, 6, 6])
    cond = b.input("cond", [], elem=TensorProto.BOOL)
    b.node("Conv", [x, b.weight("w", [5, 4, 3, 3]), b.weight("w_bias", (5,))], ["conv_out"], name="conv",
           pads=[1, 1, 1, 1])
    b.batch_norm("conv_out", "bn_out", 5, name="bn")
    branch_out = [helper.make_tensor_value_info("branch", TensorProto.FLOAT, None)]
    then_branch = helper.make_graph([helper.make_node("Relu", ["bn_out"], ["branch"])], "then", [], branch_out)
    else_branch = helper.make_graph([helper.make_node("Neg", ["bn_out"], ["branch"])], "else", [], branch_out)
    b.node("If", [cond], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)
    b.outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    return b.model(opset=15)


def checker_message(model):
    with pytest.raises(Exception) as caught:
        onnx.checker.check_model(model)
    return str(caught.value).splitlines()[0]


@pytest.mark.parametrize("build", [lambda: without_output_shape(conv_bn_model()), if_model],
                         ids=["conv_bn", "if"])
def test_a_model_only_onnxruntime_accepts_folds_with_a_one_line_warning(build):
    model = build()
    reason = checker_message(model)
    assert "shape" in reason
    feeds = random_feeds(model)
    if "cond" in feeds:
        feeds["cond"] = np.array(False)
    expected = run_ort(model, feeds)

    with pytest.warns(UserWarning) as caught:
        folded, report = fold_model(model, verify=False)
    messages = [str(w.message) for w in caught if "checker" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert reason in messages[0] and "onnxruntime loads it, so foldnorm accepts it" in messages[0]
    (note,) = [n for n in report.notes if "checker" in n]
    assert reason in note and "\n" not in note
    assert count_ops(folded, "BatchNormalization") == 0
    got = run_ort(folded, feeds)
    np.testing.assert_allclose(got["y"], expected["y"], rtol=1e-5, atol=1e-5 * np.abs(expected["y"]).max())


def test_the_command_line_folds_it_and_prints_the_note(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    path.write_bytes(without_output_shape(conv_bn_model()).SerializeToString())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["fold", str(path), "-o", str(tmp_path / "out.onnx")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err
    notes = [line for line in out.splitlines() if "checker rejects" in line]
    assert len(notes) == 1 and "Field 'shape' of 'type' is required but missing" in notes[0]
    assert count_ops(onnx.load(str(tmp_path / "out.onnx")), "BatchNormalization") == 0


def test_a_model_neither_accepts_is_refused_with_both_reasons():
    model = without_output_shape(conv_bn_model())
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(FoldError, match=r"the ONNX checker rejects it: .*and onnxruntime cannot load it: .*NoSuchOp"):
        fold_model(model, verify=False)


def test_the_levels_of_the_checks():
    assert check_model(conv_bn_model()).level == "full"
    # A declared intermediate shape that contradicts inference: the basic checker passes, the full one not.
    model = conv_bn_model()
    model.graph.value_info.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [2, 6, 3, 3]))
    assert check_model(model).level == "checker"
    with pytest.warns(UserWarning):
        assert check_model(without_output_shape(conv_bn_model())).level == "onnxruntime"
    with pytest.raises(ValueError, match="at_least must be one of"):
        check_model(conv_bn_model(), at_least="strict")


def test_a_model_that_passes_only_the_basic_checker_folds_and_still_passes_it():
    model = conv_bn_model()
    model.graph.value_info.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [2, 6, 3, 3]))
    folded, _ = fold_model(model, verify=False)
    onnx.checker.check_model(folded)
    assert count_ops(folded, "BatchNormalization") == 0


def corrupting(real_fold_in_place, corruption):
    def fold_in_place(model, **options):
        outcomes = real_fold_in_place(model, **options)
        corruption(model)
        return outcomes
    return fold_in_place


def test_a_fold_that_breaks_the_checker_is_refused(monkeypatch):
    def dangling_input(model):
        model.graph.node[0].input[1] = "nowhere"

    monkeypatch.setattr(session, "fold_in_place", corrupting(session.fold_in_place, dangling_input))
    with pytest.raises(FoldError, match="the folded model fails the ONNX checker's full check, which the original "
                                        "model passes: .*nowhere"):
        fold_model(conv_bn_model(), verify=False)


def test_a_fold_that_breaks_strict_shape_inference_is_refused(monkeypatch):
    def wrong_declared_shape(model):
        dims = model.graph.output[0].type.tensor_type.shape.dim
        dims[2].dim_value = dims[2].dim_value + 3

    monkeypatch.setattr(session, "fold_in_place", corrupting(session.fold_in_place, wrong_declared_shape))
    with pytest.raises(FoldError, match="fails the ONNX checker's full check"):
        fold_model(conv_bn_model(), verify=False)


def test_a_fold_of_a_model_only_onnxruntime_accepts_must_still_load(monkeypatch):
    def unknown_op(model):
        model.graph.node[0].op_type = "NoSuchOp"

    monkeypatch.setattr(session, "fold_in_place", corrupting(session.fold_in_place, unknown_op))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FoldError, match="onnxruntime cannot load it"):
            fold_model(without_output_shape(conv_bn_model()), verify=False)


def test_large_models_are_checked_through_their_structure_alone(monkeypatch, tmp_path):
    monkeypatch.setattr(modelio, "IN_MEMORY_CHECK_BYTES", 0)
    checked = []
    real_check = onnx.checker.check_model

    def recording_check(model, full_check=False):
        checked.append((model, onnx.load(model, load_external_data=False) if isinstance(model, str) else None))
        return real_check(model, full_check=full_check)

    monkeypatch.setattr(onnx.checker, "check_model", recording_check)
    assert check_model(conv_bn_model(channels_in=16, channels_out=16)).level == "full"  # a 9 KiB weight
    assert checked and all(isinstance(path, str) and path.endswith("model.onnx") for path, _ in checked)
    structure = checked[0][1]
    weights = {t.name: t for t in structure.graph.initializer}
    assert weights["w"].data_location == TensorProto.EXTERNAL and not weights["w"].raw_data
    with pytest.warns(UserWarning):
        assert check_model(without_output_shape(conv_bn_model())).level == "onnxruntime"
    broken = conv_bn_model()
    broken.graph.node[0].input[1] = "nowhere"
    with pytest.raises(FoldError, match="nowhere"):
        check_model(broken)
