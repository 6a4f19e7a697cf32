"""The `foldnorm` command line: what it writes, what it refuses (one line, exit code 2), and verification."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldnorm.cli import main
from tests.onnx_cases import IR_VERSION

OPSET = 17
ROOT = Path(__file__).resolve().parent.parent


def conv_bn_model(channels=16, batch=1, spatial=10, seed=0, pre_bn=False, input_name="image"):
    """Conv(3x3, pad 1) -> BN -> Relu -> Conv(1x1) -> BN; with pre_bn a BN on the input, before the padded Conv
    (it cannot fold there, and stays a BatchNormalization unless --rewrite-bn)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def constant(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def batch_norm(name, x, c):
        nodes.append(helper.make_node(
            "BatchNormalization",
            [x, constant(name + ".scale", rng.uniform(0.5, 1.5, c)), constant(name + ".bias", rng.standard_normal(c)),
             constant(name + ".mean", rng.standard_normal(c)), constant(name + ".var", rng.uniform(0.5, 2.0, c))],
            [name + "_out"], name=name))
        return name + "_out"

    x = input_name
    if pre_bn:
        x = batch_norm("input_bn", x, 3)
    nodes.append(helper.make_node("Conv", [x, constant("conv1.w", rng.standard_normal((channels, 3, 3, 3)) * 0.3)],
                                  ["conv1_out"], name="conv1", pads=[1, 1, 1, 1]))
    h = batch_norm("bn1", "conv1_out", channels)
    nodes.append(helper.make_node("Relu", [h], ["relu_out"], name="relu"))
    conv2_weight = constant("conv2.w", rng.standard_normal((channels, channels, 1, 1)) * 0.3)
    conv2_bias = constant("conv2.b", rng.standard_normal(channels))
    nodes.append(helper.make_node("Conv", ["relu_out", conv2_weight, conv2_bias], ["conv2_out"], name="conv2"))
    out = batch_norm("bn2", "conv2_out", channels)
    nodes.append(helper.make_node("Identity", [out], ["features"], name="output"))
    graph = helper.make_graph(
        nodes, "cli_model",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, spatial, spatial])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, channels, spatial, spatial])],
        initializer=inits, doc_string="graph doc",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cli-test",
                              producer_version="1.2.3", doc_string="model doc", model_version=7)
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    model.ir_version = IR_VERSION
    return model


def write_model(folder, model=None, name="model.onnx"):
    path = Path(folder) / name
    path.write_bytes((model or conv_bn_model()).SerializeToString())
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_unoptimized(model_or_path, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def listing(folder):
    return sorted(os.listdir(folder))


def assert_one_line_error(code, out, err, expected_code, *fragments):
    assert code == expected_code
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


# ---- user mistakes: one line on stderr, exit code 2, nothing written --------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    ([], "choose a command"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["fold"], "the following arguments are required: MODEL.onnx"),
    (["fold", "{model}", "--bad-option"], "unrecognized arguments: --bad-option"),
    (["fold", "{model}", "--rtol", "-1"], "argument --rtol: expected a finite non-negative number, got '-1'"),
    (["fold", "{model}", "--atol", "abc"], "argument --atol: expected a number, got 'abc'"),
    (["fold", "{model}", "--rtol", "nan"], "argument --rtol"),
    (["fold", "{model}", "--shape", "1,3,10,10"], "expected NAME=D0,D1,..."),
    (["fold", "{model}", "--shape", "image=1,3,x,10"], "must be integers separated by commas"),
    (["fold", "{model}", "--shape", "image=1,-3,10,10"], "must not be negative"),
    (["fold", "{model}", "--shape", "image=1,3,10,10", "--shape", "image=2,3,10,10"],
     "--shape gives input 'image' twice"),
    (["fold", "{model}", "--shape", "other=1,3"], "'other', which is not an input of the model"),
    (["fold", "{model}", "--shape", "image=1,3,10"], "has 3 dims; the model's input has 4"),
    (["inspect"], "the following arguments are required"),
    (["inspect", "{model}", "-q"], "-q: inspect prints nothing but its report"),
])
def test_command_line_mistakes(tmp_path, capsys, argv, fragment):
    model = write_model(tmp_path)
    before = listing(tmp_path)
    code, out, err = run_cli(capsys, *[a.format(model=model) for a in argv])
    assert_one_line_error(code, out, err, 2, fragment)
    assert listing(tmp_path) == before


def corrupt(path):
    data = bytearray(path.read_bytes())
    graph_field = data.index(b"\x3a")
    data[graph_field + 1: graph_field + 3] = b"\xff\xff"
    path.write_bytes(bytes(data))


def checker_rejects(path):
    model = onnx.load(str(path))
    model.graph.node[1].input[0] = "never_produced"
    path.write_bytes(model.SerializeToString())


def old_opset(path):
    model = onnx.load(str(path))
    model.opset_import[0].version = 6
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("spoil, fragment", [
    (lambda p: p.unlink(), "model.onnx: no such file"),
    (lambda p: (p.unlink(), p.mkdir()), "model.onnx is a directory"),
    (lambda p: p.write_text("name,value\n1,2\n"), "model.onnx is not an ONNX model"),
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "truncated or corrupted"),
    (corrupt, "truncated or corrupted"),
    (checker_rejects, "the ONNX checker rejects it"),
    (old_opset, "uses ai.onnx opset 6; foldnorm supports opsets 7 to"),
])
@pytest.mark.parametrize("command", ["fold", "inspect"])
def test_bad_model_files(tmp_path, capsys, spoil, fragment, command):
    model = write_model(tmp_path)
    spoil(model)
    before = listing(tmp_path)
    code, out, err = run_cli(capsys, command, model)
    assert_one_line_error(code, out, err, 2, "foldnorm: error: ", fragment)
    assert listing(tmp_path) == before


def external_model(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(conv_bn_model(), str(path), save_as_external_data=True, location="model.weights",
                    size_threshold=0)
    return path


def relocate(path, location):
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and tensor.name == "bn2.var":
                entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("location, fragment", [
    ("{outside}", "an absolute path"),
    ("../outside.weights", "climbs out with '..'"),
    ("link.weights", "a symlink that points outside the model's folder"),
    ("missing.weights", "the external data file 'missing.weights' of tensor 'bn2.var' is missing"),
])
def test_external_data_out_of_the_models_folder_is_refused(tmp_path, capsys, monkeypatch, location, fragment):
    path = external_model(tmp_path)
    outside = tmp_path / "outside.weights"
    outside.write_bytes((path.parent / "model.weights").read_bytes())
    os.symlink(outside, path.parent / "link.weights")
    relocate(path, location.format(outside=outside))
    from foldnorm.fold.io import external_data

    reads = []
    monkeypatch.setattr(external_data, "read_external_bytes", lambda *args: reads.append(args))
    before = listing(path.parent)
    code, out, err = run_cli(capsys, "fold", path)
    assert_one_line_error(code, out, err, 2, fragment, "bn2.var")
    assert reads == []
    assert listing(path.parent) == before


@pytest.mark.parametrize("spelling", ["{model}", "{folder}/./model.onnx", "{folder}/sub/../model.onnx", "{link}"])
def test_output_equal_to_the_input_is_refused(tmp_path, capsys, spelling):
    model = write_model(tmp_path)
    (tmp_path / "sub").mkdir()
    os.link(model, tmp_path / "hardlink.onnx")
    original = model.read_bytes()
    output = spelling.format(model=model, folder=tmp_path, link=tmp_path / "hardlink.onnx")
    code, out, err = run_cli(capsys, "fold", model, "-o", output)
    assert_one_line_error(code, out, err, 2, "is the input model")
    assert model.read_bytes() == original


def test_outputs_that_would_overwrite_the_inputs_external_data_are_refused(tmp_path, capsys):
    path = external_model(tmp_path)
    weights = path.parent / "model.weights"
    data = weights.read_bytes()
    code, out, err = run_cli(capsys, "fold", path, "-o", weights)
    assert_one_line_error(code, out, err, 2, "would overwrite the input model or its external data")
    code, out, err = run_cli(capsys, "fold", path, "--report", weights)
    assert_one_line_error(code, out, err, 2, "would overwrite")
    assert weights.read_bytes() == data


def test_report_equal_to_the_input_or_output_is_refused(tmp_path, capsys):
    model = write_model(tmp_path)
    code, out, err = run_cli(capsys, "fold", model, "--report", model)
    assert_one_line_error(code, out, err, 2, "--report")
    code, out, err = run_cli(capsys, "fold", model, "-o", tmp_path / "o.onnx", "--report", tmp_path / "o.onnx")
    assert_one_line_error(code, out, err, 2, "is the output model's path")
    assert listing(tmp_path) == ["model.onnx"]


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_destinations_that_cannot_be_written_are_refused_before_folding(tmp_path, capsys, monkeypatch, option):
    import foldnorm.fold

    monkeypatch.setattr(foldnorm.fold, "fold_model", lambda *a, **k: pytest.fail("folded before refusing"))
    model = write_model(tmp_path)
    (tmp_path / "folder").mkdir()
    code, out, err = run_cli(capsys, "fold", model, option, tmp_path / "missing" / "out")
    missing = tmp_path / "missing" / "out"
    assert_one_line_error(code, out, err, 2, "%s %s: the folder" % (option, missing), "does not exist")
    code, out, err = run_cli(capsys, "fold", model, option, tmp_path / "folder")
    assert_one_line_error(code, out, err, 2, "is a directory")
    assert listing(tmp_path) == ["folder", "model.onnx"]


# ---- folding -------------------------------------------------------------------------------------------

def test_fold_writes_a_verified_model_beside_the_input(tmp_path, capsys):
    model = write_model(tmp_path)
    original = model.read_bytes()
    code, out, err = run_cli(capsys, "fold", model)
    assert code == 0, err
    output = tmp_path / "model.folded.onnx"
    assert listing(tmp_path) == ["model.folded.onnx", "model.onnx"]
    assert model.read_bytes() == original
    assert "BatchNormalization" not in ops(output)
    assert "verification against onnxruntime (graph optimizations disabled): passed" in out
    assert "wrote %s" % output in out
    x = np.random.default_rng(7).standard_normal((1, 3, 10, 10)).astype(np.float32)
    expected = run_unoptimized(conv_bn_model(), {"image": x})[0]
    got = run_unoptimized(output, {"image": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    onnx.checker.check_model(str(output), full_check=True)


def test_fold_keeps_the_models_identity(tmp_path, capsys):
    model = write_model(tmp_path)
    assert run_cli(capsys, "fold", model, "-o", tmp_path / "out.onnx")[0] == 0
    before, after = conv_bn_model(), onnx.load(str(tmp_path / "out.onnx"))
    assert after.ir_version == before.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in after.opset_import] == [(o.domain, o.version) for o in before.opset_import]
    assert (after.producer_name, after.producer_version, after.model_version) == ("cli-test", "1.2.3", 7)
    assert after.doc_string == "model doc" and after.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in after.metadata_props} == {"author": "tests", "license": "MIT"}
    assert [i.name for i in after.graph.input] == ["image"] and [o.name for o in after.graph.output] == ["features"]
    assert after.graph.output[0].type == before.graph.output[0].type


def test_report_json_matches_the_printed_numbers(tmp_path, capsys):
    model = write_model(tmp_path, conv_bn_model(pre_bn=True))
    code, out, err = run_cli(capsys, "fold", model, "--report", tmp_path / "report.json")
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    counts = report["counts"]
    assert counts["normalizations"] == 3
    assert counts["folded"] == {"Conv": 2} and counts["rewritten"] == 0 and counts["left"] == 1
    assert "normalizations found: 3 BatchNormalization" in out
    assert "folded: 2 (Conv 2)" in out and "rewritten to Mul/Add: 0" in out and "left: 1" in out
    assert "nodes: %d -> %d" % (report["nodes_before"], report["nodes_after"]) in out
    assert "parameter bytes: {:,} -> {:,}".format(report["param_bytes_before"], report["param_bytes_after"]) in out
    verification = report["verification"]
    assert verification["passed"] is True
    assert [o["name"] for o in verification["outputs"]] == ["features"]
    assert "%.3g" % verification["outputs"][0]["max_abs_error"] in out
    assert "%.3g" % verification["outputs"][0]["max_rel_error"] in out


def test_keep_bn_leaves_what_cannot_fold(tmp_path, capsys):
    model = write_model(tmp_path, conv_bn_model(pre_bn=True))
    assert run_cli(capsys, "fold", model, "-o", tmp_path / "rewritten.onnx", "--rewrite-bn")[0] == 0
    assert "BatchNormalization" not in ops(tmp_path / "rewritten.onnx")
    assert run_cli(capsys, "fold", model, "-o", tmp_path / "default.onnx")[0] == 0
    assert ops(tmp_path / "default.onnx").count("BatchNormalization") == 1
    code, out, err = run_cli(capsys, "fold", model, "-o", tmp_path / "kept.onnx", "--keep-bn")
    assert code == 0, err
    assert ops(tmp_path / "kept.onnx").count("BatchNormalization") == 1
    assert "left: 1" in out and "input_bn" in out


def test_no_verify_skips_onnxruntime(tmp_path, capsys, monkeypatch):
    from foldnorm.fold.verification import isolated

    calls, started = [], []
    real_verify, real_start = isolated.Verifier.run, isolated.Verifier.__init__

    def recording_verify(verifier, *args, **kwargs):
        calls.append(args)
        return real_verify(verifier, *args, **kwargs)

    def recording_start(verifier):
        started.append(verifier)
        real_start(verifier)

    monkeypatch.setattr(isolated.Verifier, "run", recording_verify)
    monkeypatch.setattr(isolated.Verifier, "__init__", recording_start)
    model = write_model(tmp_path)
    code, out, err = run_cli(capsys, "fold", model, "--no-verify", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert calls == [] and started == []  # no verifying process at all
    assert "verification" not in out
    assert json.loads((tmp_path / "r.json").read_text())["verification"] is None
    assert (tmp_path / "model.folded.onnx").exists()
    # the same command without --no-verify goes through the patched function: the patch is where fold looks
    code, out, err = run_cli(capsys, "fold", model, "-o", tmp_path / "verified.onnx")
    assert code == 0, err
    assert len(calls) == 1 and "verification against onnxruntime" in out


def test_dynamic_dims_need_no_shape_and_shape_overrides_them(tmp_path, capsys):
    model = conv_bn_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[2].dim_param, dims[3].dim_param = "batch", "height", "width"
    path = write_model(tmp_path, model)
    code, out, err = run_cli(capsys, "fold", path, "--report", tmp_path / "chosen.json")
    assert code == 0, err
    verification = json.loads((tmp_path / "chosen.json").read_text())["verification"]
    assert verification["passed"] and verification["shapes_chosen"] is True
    first, second = verification["shape_sets"]
    assert first == {"image": [1, 3, 224, 224]} and second["image"][0] != 1 and second["image"][2] != 224
    assert verification["dynamic_dims"] == {"image": [0, 2, 3]}
    assert "image=[1,3,224,224]" in out and "chosen by foldnorm" in out and "model noise" in out
    code, out, err = run_cli(capsys, "fold", path, "--shape", "image=2,3,12,9", "--report", tmp_path / "r.json")
    assert code == 0, err
    verification = json.loads((tmp_path / "r.json").read_text())["verification"]
    assert verification["input_shapes"] == {"image": [2, 3, 12, 9]} and verification["shapes_chosen"] is False
    assert verification["shape_sets"] == [{"image": [2, 3, 12, 9]}]
    assert "image=[2,3,12,9]" in out and "chosen by foldnorm" not in out


def test_shape_errors_name_the_shape_option(tmp_path, capsys):
    model = conv_bn_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -5
    path = write_model(tmp_path, model)
    code, out, err = run_cli(capsys, "fold", path)
    assert_one_line_error(code, out, err, 2, "input 'image' declares dim -5 at axis 2, which is invalid",
                          "--shape image=d0,d1,...")
    assert "shapes=" not in err
    assert listing(tmp_path) == ["model.onnx"]
    code, out, err = run_cli(capsys, "fold", path, "--shape", "image=1,3,10,10")
    assert code == 0, err


def test_zero_tolerance_fails_verification_and_writes_nothing(tmp_path, capsys):
    model = write_model(tmp_path)
    code, out, err = run_cli(capsys, "fold", model, "--rtol", "0", "--atol", "0", "--report", tmp_path / "r.json")
    assert_one_line_error(code, out, err, 1, "verification failed: output 'features' diverged", "nothing written")
    assert listing(tmp_path) == ["model.onnx"]
    assert "DIVERGED" in out


def wrong_fold(real_fold_in_place):
    """A fold that writes every new weight 1% off: the kind of bug verification is there to catch."""
    def fold_in_place(model, **options):
        before = {i.name for i in model.graph.initializer}
        outcomes = real_fold_in_place(model, **options)
        for tensor in model.graph.initializer:
            if tensor.name not in before:
                array = numpy_helper.to_array(tensor) * 1.01
                tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))
        return outcomes
    return fold_in_place


def test_a_wrong_fold_is_caught_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    from foldnorm.fold import session

    monkeypatch.setattr(session, "fold_in_place", wrong_fold(session.fold_in_place))
    model = write_model(tmp_path)
    (tmp_path / "out.onnx").write_bytes(b"previous")
    code, out, err = run_cli(capsys, "fold", model, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert_one_line_error(code, out, err, 1, "output 'features' diverged", "nothing written")
    assert listing(tmp_path) == ["model.onnx", "out.onnx"]
    assert (tmp_path / "out.onnx").read_bytes() == b"previous"

    code, out, err = run_cli(capsys, "fold", model, "-o", tmp_path / "out.onnx", "--force")
    assert code == 0
    assert "written anyway because of --force" in err
    assert "BatchNormalization" not in ops(tmp_path / "out.onnx")


def test_external_data_round_trip(tmp_path, capsys):
    path = external_model(tmp_path)
    code, out, err = run_cli(capsys, "fold", path, "-o", path.parent / "out.onnx")
    assert code == 0, err
    assert "wrote %s, %s" % (path.parent / "out.onnx", path.parent / "out.onnx.data") in out
    assert listing(path.parent) == ["model.onnx", "model.weights", "out.onnx", "out.onnx.data"]
    written = onnx.load(str(path.parent / "out.onnx"), load_external_data=False)
    external = [t for t in written.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    assert external and locations == {"out.onnx.data"}
    x = np.random.default_rng(3).standard_normal((1, 3, 10, 10)).astype(np.float32)
    expected = run_unoptimized(conv_bn_model(), {"image": x})[0]
    got = run_unoptimized(path.parent / "out.onnx", {"image": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_inspect_writes_nothing(tmp_path, capsys):
    model = write_model(tmp_path, conv_bn_model(pre_bn=True))
    code, out, err = run_cli(capsys, "inspect", model)
    assert code == 0, err
    for name in ("input_bn", "bn1", "bn2"):
        assert name in out
    assert "verification" not in out
    assert listing(tmp_path) == ["model.onnx"]


# ---- a real process ---------------------------------------------------------------------------------------

def python_m_foldnorm(*argv, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "foldnorm", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_m_foldnorm_reports_mistakes_without_a_traceback(tmp_path):
    (tmp_path / "notes.onnx").write_text("not a model")
    for argv, fragment in [(["fold", "missing.onnx"], "missing.onnx: no such file"),
                           (["fold", "notes.onnx"], "notes.onnx is not an ONNX model"),
                           (["fold", "notes.onnx", "--shape", "x"], "expected NAME=D0,D1,...")]:
        result = python_m_foldnorm(*argv, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and fragment in result.stderr and "Traceback" not in result.stderr
    assert listing(tmp_path) == ["notes.onnx"]


def test_python_m_foldnorm_folds(tmp_path):
    write_model(tmp_path)
    result = python_m_foldnorm("fold", "model.onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "passed" in result.stdout and (tmp_path / "model.folded.onnx").exists()


# ---- nothing to fold; what is printed: -q, -v, progress -----------------------------------------------------

def conv_only_model():
    """A Conv with no BatchNormalization after it: what an exporter that folds BN itself writes."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["y"], name="conv")], "no_bn",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def training_mode_model():
    model = conv_bn_model()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.append(helper.make_attribute("training_mode", 1))
            node.output.extend([node.name + "_running_mean", node.name + "_running_var"])
    return model


def parameters_as_inputs_model():
    model = conv_bn_model()
    for name in ("bn1.scale", "bn2.scale"):
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [16]))
    return model


@pytest.mark.parametrize("build, reason", [
    (conv_only_model, "the model has no BatchNormalization; its exporter likely folded them already"),
    (training_mode_model, "of 2 BatchNormalization, 2 in training mode"),
    (parameters_as_inputs_model, "2 whose parameters are initializers also listed as graph inputs, which a caller "
                                 "may override (--fold-input-initializers treats them as constants)"),
])
def test_nothing_to_fold_is_said_in_one_line_and_the_model_is_still_written(tmp_path, capsys, build, reason):
    path = write_model(tmp_path, build())
    # onnxruntime does not run a training-mode BatchNormalization in an inference session: no verification
    extra = ["--no-verify"] if build is training_mode_model else []
    code, out, err = run_cli(capsys, "fold", path, "--keep-bn", "--report", tmp_path / "r.json", *extra)
    assert code == 0, err
    lines = [line for line in out.splitlines() if "nothing was folded" in line]
    assert len(lines) == 1 and reason in lines[0], out
    assert json.loads((tmp_path / "r.json").read_text())["nothing_folded"] == lines[0].strip()
    written = onnx.load(str(tmp_path / "model.folded.onnx"))
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in build().graph.node]


def test_something_folded_says_nothing_of_the_sort(tmp_path, capsys):
    code, out, err = run_cli(capsys, "fold", write_model(tmp_path), "--report", tmp_path / "r.json")
    assert code == 0 and "nothing was folded" not in out
    assert json.loads((tmp_path / "r.json").read_text())["nothing_folded"] is None


def test_quiet_prints_nothing_but_errors(tmp_path, capsys):
    model = write_model(tmp_path)
    code, out, err = run_cli(capsys, "fold", model, "-q")
    assert code == 0 and out == "" and err == ""
    assert (tmp_path / "model.folded.onnx").exists()
    code, out, err = run_cli(capsys, "fold", model, "-q", "--rtol", "0", "--atol", "0", "-o", tmp_path / "o.onnx")
    assert_one_line_error(code, out, err, 1, "verification failed")
    assert out == ""


def test_verbose_shows_each_step_and_every_node(tmp_path, capsys):
    model = write_model(tmp_path, conv_bn_model(pre_bn=True))
    code, out, err = run_cli(capsys, "fold", model, "-v")
    assert code == 0, err
    steps = [line for line in err.splitlines() if line.startswith("foldnorm: [")]
    for fragment in ("reading", "folding", "running the original", "running the folded", "rounding noise",
                     "writing"):
        assert any(fragment in line for line in steps), err
    assert "folded into Conv" in out  # every node, not only those left
    code, out, err = run_cli(capsys, "fold", model, "-q", "-v")
    assert_one_line_error(code, out, err, 2, "not allowed with argument")


class FakeTerminal:
    """A stderr that says it is a terminal and records what is written to it."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_progress_on_a_terminal_shows_slow_steps_on_one_line_and_clears_it(tmp_path, capsys, monkeypatch):
    from foldnorm import cli

    terminal = FakeTerminal()
    monkeypatch.setattr(cli.sys, "stderr", terminal)
    monkeypatch.setattr(cli.Progress, "SHOW_AFTER", 0.0)  # every step counts as slow
    code = main(["fold", str(write_model(tmp_path))])
    out, _ = capsys.readouterr()
    assert code == 0
    for step in ("reading", "folding", "verification: running the folded model", "writing"):
        assert "\r\033[Kfoldnorm: %s" % step in terminal.text
    assert terminal.text.endswith("\r\033[K")  # the line is cleared before the report prints
    assert "\n" not in terminal.text and "passed" in out


def test_progress_shows_a_step_only_after_it_has_run_a_while():
    import time

    from foldnorm.cli import Progress

    terminal = FakeTerminal()
    progress = Progress(stream=terminal)
    progress.SHOW_AFTER = 0.05
    progress.step("slow step")
    time.sleep(0.5)
    progress.step("next step")
    progress.done()
    assert terminal.text == "\r\033[Kfoldnorm: slow step ...\r\033[Kfoldnorm: next step ...\r\033[K"


def test_progress_is_silent_when_stderr_is_not_a_terminal_or_steps_are_quick(tmp_path, capsys):
    code, out, err = run_cli(capsys, "fold", write_model(tmp_path))
    assert code == 0 and err == ""
    terminal = FakeTerminal()
    from foldnorm.cli import Progress

    progress = Progress(stream=terminal)
    progress.step("a quick step")
    progress.done()
    assert terminal.text == ""  # done before SHOW_AFTER seconds: nothing shown


def test_an_unwritable_report_folder_leaves_nothing_written(tmp_path, capsys, monkeypatch):
    import tempfile as tempfile_module

    model = write_model(tmp_path)
    (tmp_path / "ro").mkdir()
    real_mkstemp = tempfile_module.mkstemp

    def read_only(*args, dir=None, **kwargs):  # a read-only folder, even for root
        if dir is not None and Path(dir).name == "ro":
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile_module, "mkstemp", read_only)
    code, out, err = run_cli(capsys, "fold", model, "-o", tmp_path / "out.onnx", "--report", tmp_path / "ro" / "r.json")
    assert_one_line_error(code, out, err, 2, "--report", "cannot write in the folder", "Permission denied")
    assert listing(tmp_path) == ["model.onnx", "ro"] and listing(tmp_path / "ro") == []


def test_a_model_with_a_rank_0_bool_input_folds_and_verifies(tmp_path, capsys):
    """A BN inside each branch of an If whose condition is a rank-0 bool graph input."""
    rng = np.random.default_rng(3)

    def branch(name, sign):
        inits = [numpy_helper.from_array((sign * rng.standard_normal((4, 3, 1, 1))).astype(np.float32), name + ".w")]
        for part, values in (("scale", rng.uniform(0.5, 1.5, 4)), ("bias", rng.standard_normal(4)),
                             ("mean", rng.standard_normal(4)), ("var", rng.uniform(0.5, 2.0, 4))):
            inits.append(numpy_helper.from_array(values.astype(np.float32), "%s.%s" % (name, part)))
        nodes = [helper.make_node("Conv", ["image", name + ".w"], [name + "_conv"], name=name + "_conv"),
                 helper.make_node("BatchNormalization", [name + "_conv"] + ["%s.%s" % (name, p) for p in
                                  ("scale", "bias", "mean", "var")], [name + "_y"], name=name + "_bn")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(name + "_y", TensorProto.FLOAT,
                                                                                 ["N", 4, 5, 5])], initializer=inits)

    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", -1.0))],
        "if_model",
        [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
         helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    path = write_model(tmp_path, model)
    code, out, err = run_cli(capsys, "fold", path, "--report", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["counts"]["folded"] == {"Conv": 2} and report["verification"]["passed"]
    assert report["verification"]["input_shapes"]["flag"] == []
    folded = onnx.load(str(tmp_path / "model.folded.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    for flag in (True, False):
        feeds = {"flag": np.array(flag), "image": x}
        np.testing.assert_allclose(run_unoptimized(folded, feeds)[0], run_unoptimized(model, feeds)[0],
                                   rtol=1e-5, atol=1e-5)


def test_an_error_clears_the_progress_line_before_its_message(tmp_path, capsys, monkeypatch):
    from foldnorm import cli

    terminal = FakeTerminal()
    monkeypatch.setattr(cli.sys, "stderr", terminal)
    monkeypatch.setattr(cli.Progress, "SHOW_AFTER", 0.0)
    model = conv_bn_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40
    code = main(["fold", str(write_model(tmp_path, model))])
    assert code == 2
    shown, _, message = terminal.text.rpartition("\r\033[K")
    assert "foldnorm: " in shown  # a step was on the line, and was cleared
    assert message.startswith("foldnorm: error: ") and message.count("\n") == 1 and "limit" in message
