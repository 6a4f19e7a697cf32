"""The model session: one read, outcomes as data, verification in a process of its own (and onnx's reference
evaluator where onnxruntime has no kernel), shape-only readers, BNs kept unless a rewrite merges something,
initializers listed as inputs taken as constants on request."""
import ast
import os
import pathlib
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldnorm.fold import FoldError, VerificationError, fold_model, inspect_model
from foldnorm.fold.io import modelio
from foldnorm.fold.report import Action, Cause
from foldnorm.fold.session import ModelSession
from foldnorm.fold.verification import runner
from tests.fold.fold_models import ModelBuilder, conv_bn_model, count_ops, max_relative_error, random_feeds

FOLD_PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "foldnorm" / "fold"


def batch_norm_on_the_input(opset=17):
    """x (a graph input) -> BN with constant parameters -> Relu: nothing can absorb the BN."""
    b = ModelBuilder(1)
    x = b.input("x", [2, 3, 5, 5])
    b.batch_norm(x, "n", 3, name="bn")
    b.node("Relu", ["n"], ["y"])
    b.output("y", [2, 3, 5, 5])
    return b.model(opset=opset)


def parameters_as_inputs(initializer_defaults):
    """Conv -> BN whose four parameters are graph inputs (with initializers as defaults when asked)."""
    b = ModelBuilder(2)
    x = b.input("x", [1, 3, 6, 6])
    b.node("Conv", [x, b.weight("w", [4, 3, 3, 3])], ["c"], name="conv")
    params = b.batch_norm_params("bn", 4)
    b.node("BatchNormalization", ["c"] + params, ["y"], name="bn")
    b.output("y", [1, 4, 4, 4])
    model = b.model()
    for name in params:
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [4]))
    if not initializer_defaults:
        kept = [t for t in model.graph.initializer if t.name not in params]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model, params


# ------------------------------------------------------------------------------------ outcomes as data

def test_a_batch_norm_on_a_graph_input_is_not_said_to_have_graph_input_parameters():
    report = inspect_model(batch_norm_on_the_input())
    (bn,) = report.normalizations()
    assert bn.action is Action.LEFT and bn.cause is Cause.NO_ABSORBER
    assert "its input 'x' is a graph input" in bn.reason
    summary = report.nothing_folded()
    assert "whose parameters are graph inputs" not in summary and "re-export" not in summary
    assert summary.startswith("nothing was folded: of 1 BatchNormalization, 1 because its input 'x' is a graph input")


def test_parameters_that_are_graph_inputs_are_summed_up_by_their_cause():
    model, _ = parameters_as_inputs(initializer_defaults=False)
    report = inspect_model(model)
    (bn,) = report.normalizations()
    assert bn.cause is Cause.PARAMETER_INPUT
    assert "1 whose parameters are graph inputs (re-export with the parameters as constants)" in \
        report.nothing_folded()
    data = report.to_dict()
    assert data["outcomes"][0]["action"] == "left" and data["outcomes"][0]["cause"] == "parameter_input"


# ------------------------------------------------------------------- initializers listed as graph inputs

def test_initializers_listed_as_inputs_fold_only_when_asked(tmp_path):
    model, params = parameters_as_inputs(initializer_defaults=True)
    report = inspect_model(model)
    assert report.normalizations()[0].cause is Cause.PARAMETER_OVERRIDABLE
    assert "fold_input_initializers=True" in report.nothing_folded()

    folded, report = fold_model(model, fold_input_initializers=True)
    assert count_ops(folded, "BatchNormalization") == 0 and report.verification.passed
    assert [i.name for i in folded.graph.input] == ["x"]
    note = next(n for n in report.to_dict()["notes"] if "removed them from the inputs" in n)
    assert "(fold_input_initializers=True)" in note and all(name in note for name in params)
    feeds = random_feeds(model)
    assert max_relative_error(model, folded, feeds) < 1e-5
    assert [i.name for i in model.graph.input][1:] == params  # the caller's model is untouched


# --------------------------------------------------------------------------------- never slower

def test_a_batch_norm_that_cannot_fold_stays_one_unless_a_rewrite_merges_something():
    model = batch_norm_on_the_input()
    folded, report = fold_model(model)
    assert [n.op_type for n in folded.graph.node] == ["BatchNormalization", "Relu"]
    assert "kept as BatchNormalization" in report.normalizations()[0].reason
    assert "rewrite_bn=True" in report.normalizations()[0].reason

    b = ModelBuilder(1)
    x = b.input("x", [2, 3, 5, 5])
    b.batch_norm(x, "n", 3, name="bn")
    b.node("Mul", ["n", b.constant("gamma", np.array([0.5, 2.0, -1.0]).reshape(3, 1, 1))], ["m"], name="scale")
    b.node("Relu", ["m"], ["y"])
    b.output("y", [2, 3, 5, 5])
    scaled = b.model()
    folded, report = fold_model(scaled)
    assert [n.op_type for n in folded.graph.node] == ["Mul", "Add", "Relu"]
    bn = report.normalizations()[0]
    assert bn.action is Action.REWRITTEN and "with Mul 'scale' after it merged in" in bn.reason
    assert max_relative_error(scaled, folded, random_feeds(scaled)) < 1e-5


# ---------------------------------------------------------------------------- shape-only readers

def tokens_through_a_shape(bias=True):
    """torchscript's BatchNorm1d over flattened tokens: h = x @ W (+ b); y = BN(h.reshape(-1, C)).reshape(
    shape(h)): h has a second reader, the Shape that only reads its dims."""
    b = ModelBuilder(4)
    x = b.input("x", ["batch", 5, 6])
    h = b.node("MatMul", [x, b.weight("w", [6, 8])], ["mm"], name="matmul")
    if bias:
        h = b.node("Add", [h, b.weight("b", [8])], ["h"], name="bias")
    shape = b.node("Shape", [h], ["shape"], name="shape")
    flat = b.node("Reshape", [h, b.constant("flat", np.array([-1, 8]), np.int64)], ["flat_h"], name="flatten")
    b.batch_norm(flat, "n", 8, name="bn")
    b.node("Reshape", ["n", shape], ["y"], name="unflatten")
    b.output("y", ["batch", 5, 8])
    return b.model()


@pytest.mark.parametrize("bias", [True, False])
def test_a_shape_reader_does_not_block_the_fold_into_the_matmul(bias):
    model = tokens_through_a_shape(bias)
    folded, report = fold_model(model)
    (bn,) = report.normalizations()
    assert bn.action is Action.FOLDED and bn.into == "MatMul" and "through Reshape" in bn.reason
    assert count_ops(folded, "BatchNormalization") == count_ops(folded, "Mul") == 0
    assert report.verification.passed
    assert max_relative_error(model, folded, random_feeds(model, shapes={"x": [3, 5, 6]})) < 1e-5


def test_a_shape_reader_of_the_layer_output_reads_the_folded_value():
    b = ModelBuilder(5)
    x = b.input("x", [2, 3, 6, 6])
    c = b.conv(x, 3, 4, 3, name="conv")
    b.node("Shape", [c], ["dims"], name="shape")
    b.batch_norm(c, "y", 4, name="bn")
    b.output("y", [2, 4, 6, 6])
    b.output("dims", [4], elem=TensorProto.INT64)
    model = b.model()
    folded, report = fold_model(model)
    assert report.normalizations()[0].action is Action.FOLDED
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Shape"]
    assert folded.graph.node[1].input[0] == folded.graph.node[0].output[0] == "y"
    assert max_relative_error(model, folded, random_feeds(model)) < 1e-5


def test_the_torchscript_token_mlp_with_a_shape_reader_folds_into_its_matmul(tmp_path):
    torch = pytest.importorskip("torch")

    class FlatTokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(6, 8)
            self.bn = torch.nn.BatchNorm1d(8)

        def forward(self, x):
            h = self.mix(x)
            return torch.relu(self.bn(h.reshape(-1, h.shape[-1])).reshape(h.shape))

    torch.manual_seed(0)
    module = FlatTokens().eval()
    with torch.no_grad():
        module.bn.running_mean.uniform_(-1, 1)
        module.bn.running_var.uniform_(0.5, 2)
        module.bn.weight.uniform_(-2, 2)
    x = torch.randn(2, 5, 6)
    path = tmp_path / "tokens.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    assert count_ops(onnx.load(str(path)), "Shape") >= 1
    folded, report = fold_model(path)
    assert [(o.action, o.into) for o in report.normalizations()] == [(Action.FOLDED, "MatMul")]
    assert count_ops(folded, "Mul") == 0 and report.verification.passed
    import onnxruntime as ort

    got = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    expected = module(x).detach().numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


# -------------------------------------------------------------------------------- verification

def float64_conv_bn():
    b = ModelBuilder(6, dtype=np.float64)
    x = b.input("x", [2, 3, 6, 6])
    b.node("Conv", [x, b.weight("w", [4, 3, 3, 3])], ["c"], name="conv", pads=[1, 1, 1, 1])
    b.batch_norm("c", "y", 4, name="bn")
    b.output("y", [2, 4, 6, 6])
    return b.model()


def numpy_conv_bn(model, x):
    """The model's output in float64 NumPy: 3x3 Conv, pads 1, then the BatchNormalization."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = values["w"]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # n, c, h, w, 3, 3
    conv = np.einsum("nchwij,ocij->nohw", windows, w)
    scale, bias, mean, var = (values["bn_" + p].reshape(1, -1, 1, 1) for p in ("scale", "bias", "mean", "var"))
    return (conv - mean) / np.sqrt(var + 1e-5) * scale + bias


def test_a_float64_model_onnxruntime_cannot_run_is_verified_by_the_reference_evaluator():
    model = float64_conv_bn()
    folded, report = fold_model(model)
    verification = report.verification
    assert verification.passed and verification.verifier == "onnx's reference evaluator"
    assert any("onnxruntime cannot run the original model" in note and "16,777,216 bytes" in note
               for note in verification.notes)
    assert "verification against onnx's reference evaluator: passed" in report.format_text()
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6))
    from onnx.reference import ReferenceEvaluator

    got = ReferenceEvaluator(folded).run(None, {"x": x})[0]
    expected = numpy_conv_bn(model, x)
    assert np.abs(got - expected).max() <= 1e-13 * np.abs(expected).max()


def test_the_reference_evaluator_refuses_a_model_past_its_size_limit(monkeypatch):
    monkeypatch.setattr(runner, "REFERENCE_LIMIT_BYTES", 100)
    model = float64_conv_bn()
    folded, _ = fold_model(model, verify=False)
    with pytest.raises(FoldError, match=r"Conv.*used up to 100 bytes of parameters and this model has 992 "
                                        r"\(skip verification with verify=False\)"):
        runner.verify(model, folded)


def opset_7_batch_norm_with_five_outputs():
    """A Conv, then an opset-7 BatchNormalization with all five outputs (its running and saved statistics
    read by nothing): training mode, as the specification of opsets 7 to 13 reads it."""
    rng = np.random.default_rng(7)
    tensors = {"w": rng.standard_normal((4, 3, 3, 3)), "s": rng.uniform(0.5, 2, 4), "b": rng.standard_normal(4),
               "m": rng.standard_normal(4), "v": rng.uniform(0.5, 2, 4)}
    initializers = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in tensors.items()]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"],
                              ["y", "running_mean", "running_var", "saved_mean", "saved_var"], name="bn")]
    graph = helper.make_graph(nodes, "five", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 6])], initializers)
    graph.input.extend(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


def test_the_five_output_batch_norm_is_left_and_verified_in_a_process_of_its_own():
    model = opset_7_batch_norm_with_five_outputs()
    folded, report = fold_model(model)
    (bn,) = report.normalizations()
    assert bn.action is Action.LEFT and bn.cause is Cause.TRAINING_MODE
    assert report.verification.passed and report.verification.verifier == "onnxruntime"
    assert folded.graph == model.graph


def test_a_failed_verification_says_what_diverged_and_nothing_of_writing(monkeypatch):
    model = conv_bn_model()
    with pytest.raises(VerificationError) as caught:
        fold_model(model, rtol=0.0, atol=0.0)
    assert "nothing was written" not in str(caught.value)
    assert caught.value.outputs and caught.value.report.verification is not None
    assert "the folded model's output %r differs" % caught.value.outputs[0] in str(caught.value)


def test_the_input_file_is_read_once(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_model(), str(path), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    reads = []
    real_read = modelio._read_model_file

    def counting_read(where):
        reads.append(where)
        return real_read(where)

    monkeypatch.setattr(modelio, "_read_model_file", counting_read)
    with ModelSession(path) as session:
        session.fold()
        assert session.verify().passed
        assert session.data_files == {os.path.realpath(tmp_path / "model.onnx.data")}
    assert reads == [path]


# ----------------------------------------------------------------------------------- the package

def test_the_fold_package_keeps_no_module_level_state():
    for source in FOLD_PACKAGE.rglob("*.py"):
        tree = ast.parse(source.read_text())
        assert not any(isinstance(node, ast.Global) for node in ast.walk(tree)), source
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                decorators = [ast.unparse(d) for d in node.decorator_list]
                assert not any("cache" in d for d in decorators), (source, node.name)
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.List, ast.Dict, ast.Set)):
                names = [ast.unparse(t) for t in node.targets]
                assert all(name.lstrip("_").isupper() or name == "__all__" for name in names), (source, names)


def _imports(source, module):
    """The foldnorm.fold modules `module` (dotted, in foldnorm.fold) imports anywhere in its file."""
    package = module.split(".")[:-1] if source.name != "__init__.py" else module.split(".")
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] if node.level > 1 else package
            target = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                found.add(".".join(target + [alias.name]))
                found.add(".".join(target))
    return found


def test_the_fold_package_has_no_import_cycles():
    modules = {}
    for source in FOLD_PACKAGE.rglob("*.py"):
        parts = list(source.relative_to(FOLD_PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = source
    graph = {name: {m for m in _imports(source, name) if m in modules and m != name and m != ""}
             for name, source in modules.items() if name}

    def reaches(start, goal, seen):
        for nxt in graph.get(start, ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    packages = {name for name, source in modules.items() if source.name == "__init__.py"}
    cycles = [name for name in graph if name not in packages and reaches(name, name, set())]
    assert cycles == []
    for gone in (("io.proto", "io.external_data"), ("verification.runner", "quantized.steps")):
        assert not (reaches(gone[0], gone[1], set()) and reaches(gone[1], gone[0], set()))
