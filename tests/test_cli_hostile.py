"""Hostile models through `foldnorm fold`: truncated, flipped, semantically broken, huge, path attacks,
unwritable destinations. Each ends in one line on stderr and exit code 2 (1 for a failed verification),
with nothing written, no temporary file left, and no file opened outside the model's folder, the output's
folder and foldnorm's own temporary folder."""
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldnorm.cli import main
from foldnorm.fold.io.wire import PROTOBUF_MAX_DEPTH, diagnose
from tests.onnx_cases import IR_VERSION

ROOT = Path(__file__).resolve().parent.parent
OPSET = 17


def conv_bn_model(dims=(1, 3, 8, 8), channels=4):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((channels, 3, 3, 3)).astype(np.float32),
              "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
              "bias": rng.standard_normal(channels).astype(np.float32),
              "mean": rng.standard_normal(channels).astype(np.float32),
              "var": rng.uniform(0.5, 2.0, channels).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "hostile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], channels, *dims[2:]])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


@pytest.fixture
def place(tmp_path, monkeypatch):
    """models/ (the input's folder), out/ (the output's), tmp/ (the system temp dir for this test)."""
    folders = {name: tmp_path / name for name in ("models", "out", "tmp")}
    for folder in folders.values():
        folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folders["tmp"]))
    return folders


def listing(folder):
    return sorted(os.listdir(folder))


def fold(capsys, place, model_name, *extra):
    argv = ["fold", str(place["models"] / model_name), "-o", str(place["out"] / "out.onnx"),
            "--report", str(place["out"] / "r.json"), *map(str, extra)]
    before = listing(place["models"])
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "[E:onnxruntime" not in err and "Warning" not in err, err
    assert listing(place["models"]) == before, "the model's folder changed"
    assert listing(place["tmp"]) == [], "temporary files left behind"
    if code != 0:
        assert err.count("\n") == 1 and err.startswith("foldnorm: "), err
        assert listing(place["out"]) == [], "a failed command wrote something"
    return code, err


def save(place, model, name="m.onnx"):
    path = place["models"] / name
    path.write_bytes(model.SerializeToString())
    return path


# ---- bytes that are not a model -------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_models(capsys, place, keep):
    data = conv_bn_model().SerializeToString()
    (place["models"] / "m.onnx").write_bytes(data[: int(len(data) * keep)])
    code, err = fold(capsys, place, "m.onnx")
    assert code == 2 and ("truncated or corrupted" in err or "not a valid ONNX model" in err), err


@pytest.mark.parametrize("seed", range(12))
def test_flipped_bytes_never_crash(capsys, place, seed):
    rng = np.random.default_rng(seed)
    data = bytearray(conv_bn_model().SerializeToString())
    for position in rng.integers(0, len(data), size=1 + seed % 4):
        data[position] ^= 1 << int(rng.integers(0, 8))
    (place["models"] / "m.onnx").write_bytes(bytes(data))
    code, err = fold(capsys, place, "m.onnx")
    assert code in (0, 1, 2)
    if code == 0:
        onnx.checker.check_model(onnx.load(str(place["out"] / "out.onnx")))


def varint(value):
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def message_field(number, payload):
    """A length-delimited protobuf field, written by hand."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_a_decode_error_names_the_field():
    broken_tensor = bytes([9 << 3 | 2, 100]) + b"short"  # raw_data says 100 bytes, holds 5
    node = message_field(4, b"Conv") + message_field(5, message_field(5, broken_tensor))  # op_type, attribute{t}
    model = varint(1 << 3) + varint(8) + message_field(7, message_field(1, b"") + message_field(1, node))
    assert diagnose(model) == ("broken", "the length of field 9 at byte 18 of graph.node[1].attribute[0].t runs "
                                         "past its end")
    assert diagnose(conv_bn_model().SerializeToString()) is None


def nested_if_model_bytes(depth):
    """A model whose If nodes nest `depth` levels deep: 3 protobuf messages per level (graph, node,
    attribute). Written as bytes, since protobuf itself cannot build a message it could not read."""
    leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "leaf", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    output = message_field(12, helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]).SerializeToString())
    graph = leaf.SerializeToString()
    for _ in range(depth):
        node = helper.make_node("If", ["c"], ["y"], else_branch=leaf)
        # AttributeProto then_branch: name (1), type (20) = GRAPH (5), g (6) = the graph one level down
        then_branch = message_field(1, b"then_branch") + varint(20 << 3) + varint(5) + message_field(6, graph)
        graph = message_field(1, node.SerializeToString() + message_field(5, then_branch)) + output
    inputs = b"".join(message_field(11, helper.make_tensor_value_info(name, elem, dims).SerializeToString())
                      for name, elem, dims in (("c", TensorProto.BOOL, []), ("x", TensorProto.FLOAT, [1])))
    top = onnx.ModelProto(ir_version=IR_VERSION)
    top.opset_import.extend([helper.make_opsetid("", OPSET)])
    return top.SerializeToString() + message_field(7, graph + inputs)


def test_a_model_nested_past_protobufs_depth_limit_is_called_that(capsys, place):
    shallow = onnx.ModelProto()
    shallow.ParseFromString(nested_if_model_bytes(5))  # the builder makes models protobuf reads
    assert shallow.graph.node[0].op_type == "If"
    (place["models"] / "m.onnx").write_bytes(nested_if_model_bytes(PROTOBUF_MAX_DEPTH // 3 + 5))
    code, err = fold(capsys, place, "m.onnx")
    assert code == 2 and "deeper than protobuf's limit of 100 levels" in err and "truncated" not in err, err


# ---- models that parse but are wrong ---------------------------------------------------------------------

def checker_rejects():
    model = conv_bn_model()
    del model.graph.node[0].input[1:]  # a Conv with no weight
    return model


def onnxruntime_rejects():
    model = conv_bn_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((4, 5, 3, 3), np.float32), "w"))
    return model


def invalid_dim():
    model = conv_bn_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -5
    return model


def huge_declared_dim():
    return conv_bn_model(dims=(2**40, 3, 8, 8))


@pytest.mark.parametrize("build, extra, fragments", [
    (checker_rejects, [], ["the ONNX checker rejects it", "conv"]),
    (onnxruntime_rejects, [], ["onnxruntime cannot run the original model", "Conv node 'conv'", "kernel channels"]),
    (invalid_dim, [], ["declares dim -5 at axis 1, which is invalid", "--shape x="]),
    (huge_declared_dim, [], ["bytes for verification, more than its limit", "--no-verify"]),
    (lambda: conv_bn_model(dims=("N", 3, 8, 8)), ["--shape", "x=1099511627776,3,8,8"],
     ["bytes for verification, more than its limit"]),
    (conv_bn_model, ["--shape", "x=1,3,8"], ["has 3 dims; the model's input has 4"]),
])
def test_semantically_broken_models(capsys, place, build, extra, fragments):
    save(place, build())
    code, err = fold(capsys, place, "m.onnx", *extra)
    assert code == 2
    for fragment in fragments:
        assert fragment in err, err
    assert "dynamic" not in err.split("which is invalid")[0]


def test_a_checker_message_keeps_the_nodes_name(capsys, place):
    save(place, checker_rejects())
    _, err = fold(capsys, place, "m.onnx")
    assert "Name: conv OpType: Conv" in err, err


def test_a_huge_declared_dim_folds_without_verification(capsys, place):
    save(place, huge_declared_dim())
    code, err = fold(capsys, place, "m.onnx", "--no-verify")
    assert code == 0, err


# ---- path attacks ----------------------------------------------------------------------------------------

def external_model(place, location):
    model = conv_bn_model()
    tensor = model.graph.initializer[0]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    for key, value in (("location", location), ("offset", "0"), ("length", "432")):
        tensor.external_data.add(key=key, value=value)
    return save(place, model)


def test_external_data_path_attacks(capsys, place, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 432)
    for location, fragment in [(str(secret), "an absolute path"), ("../secret.bin", "climbs out with '..'"),
                               ("link.bin", "a symlink that points outside")]:
        if location == "link.bin":
            os.symlink(secret, place["models"] / "link.bin")
        external_model(place, location)
        code, err = fold(capsys, place, "m.onnx")
        assert code == 2 and fragment in err, err


def test_a_symlink_loop_as_external_data_is_called_a_loop(capsys, place):
    os.symlink(place["models"] / "b.bin", place["models"] / "a.bin")
    os.symlink(place["models"] / "a.bin", place["models"] / "b.bin")
    external_model(place, "a.bin")
    code, err = fold(capsys, place, "m.onnx")
    assert code == 2 and "symlink loop" in err and "missing" not in err, err


def test_a_training_info_tensors_external_location_is_checked(capsys, place):
    model = conv_bn_model()
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "lr")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    tensor.external_data.add(key="location", value="../../etc/passwd")
    initialization = helper.make_graph([], "init", [], [], initializer=[tensor])
    model.training_info.add().initialization.CopyFrom(initialization)
    save(place, model)
    code, err = fold(capsys, place, "m.onnx")
    assert code == 2 and "'lr'" in err and "climbs out with '..'" in err, err


# ---- destinations that cannot be written ------------------------------------------------------------------

@pytest.mark.parametrize("option", ["-o", "--report"])
def test_unwritable_destinations_write_nothing(capsys, place, option):
    save(place, conv_bn_model())
    # /proc takes no new files, even from root: an unwritable folder on any Linux machine
    argv = {"-o": ["-o", "/proc/foldnorm-out.onnx"], "--report": ["--report", "/proc/foldnorm-r.json"]}[option]
    code = main(["fold", str(place["models"] / "m.onnx"), "-o", str(place["out"] / "out.onnx"), *argv])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "cannot write in the folder /proc" in err, err
    assert listing(place["out"]) == [] and listing(place["tmp"]) == []


def test_a_failed_verification_writes_nothing(capsys, place):
    save(place, conv_bn_model())
    code, err = fold(capsys, place, "m.onnx", "--rtol", "0", "--atol", "0")
    assert code == 1 and "verification failed" in err


# ---- a real process: stderr, files opened ---------------------------------------------------------------------

AUDIT = textwrap.dedent("""
    import json, sys, warnings
    import numpy, onnx, onnxruntime
    import foldnorm.cli, foldnorm.fold, foldnorm.fold.verification.runner
    opened = []
    sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" else None)
    code = foldnorm.cli.main(sys.argv[2:])
    paths = [p for p in opened if isinstance(p, str)]
    with open(sys.argv[1], "w") as log:
        json.dump(paths, log)
    sys.exit(code)
""")


def audited_fold(place, *argv):
    """Run the command in a fresh interpreter; (result, paths it opened, what an interpreter that only
    imports onnxruntime leaves in the temp dir, which is not foldnorm's doing)."""
    log = place["out"].parent / "opened.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(place["tmp"]))
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True, timeout=60)
    baseline = listing(place["tmp"])
    result = subprocess.run([sys.executable, "-c", AUDIT, str(log), "fold", *map(str, argv)], env=env,
                            capture_output=True, text=True, timeout=300)
    opened = json.loads(log.read_text()) if log.exists() else []
    log.unlink(missing_ok=True)
    return result, opened, baseline


def outside(paths, place):
    allowed = [str(place["models"]), str(place["out"]), str(place["tmp"]), sys.prefix, sys.base_prefix,
               str(ROOT / "foldnorm"), "/proc/", "/sys/", "/dev/"]
    return [p for p in paths if not any(os.path.realpath(p).startswith(os.path.realpath(a)) or p.startswith(a)
                                        for a in allowed)]


@pytest.mark.parametrize("case", ["ok", "onnxruntime_rejects", "huge_rtol", "path_attack"])
def test_a_real_process_prints_one_line_and_opens_only_its_folders(place, tmp_path, case):
    model = onnxruntime_rejects() if case == "onnxruntime_rejects" else conv_bn_model()
    path = save(place, model)
    extra = ["--rtol", "1e308"] if case == "huge_rtol" else []
    if case == "path_attack":
        (tmp_path / "secret.bin").write_bytes(b"\0" * 432)
        path = external_model(place, "../secret.bin")
    result, opened, baseline = audited_fold(place, path, "-o", place["out"] / "out.onnx", *extra)
    assert "Traceback" not in result.stderr and "onnxruntime" not in result.stderr.split(":")[0]
    assert "[E:onnxruntime" not in result.stderr and "RuntimeWarning" not in result.stderr, result.stderr
    if case in ("ok", "huge_rtol"):
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert listing(place["out"]) == ["out.onnx"]
    else:
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert listing(place["out"]) == []
    assert listing(place["tmp"]) == baseline
    assert any(os.path.basename(p) == "m.onnx" for p in opened), "the audit hook did not see the model read"
    assert outside(opened, place) == []


SLOW = textwrap.dedent("""
    import sys, time
    import foldnorm.cli, foldnorm.fold.verification.isolated

    def slow_verify(verifier, *args, folder, **kwargs):
        open(folder + "/partial", "wb").close()  # a temporary file in the session's scratch folder
        print("verifying", flush=True)
        time.sleep(60)

    foldnorm.fold.verification.isolated.Verifier.run = slow_verify
    sys.exit(foldnorm.cli.main(sys.argv[1:]))
""")


def test_sigterm_leaves_nothing_behind(place):
    import signal

    path = save(place, conv_bn_model())
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(place["tmp"]))
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True, timeout=60)
    baseline = listing(place["tmp"])
    process = subprocess.Popen([sys.executable, "-c", SLOW, "fold", str(path), "-o", str(place["out"] / "o.onnx")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "verifying\n"
    assert any(name.startswith("foldnorm-") for name in listing(place["tmp"]))
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert err == "foldnorm: terminated; nothing written\n"
    assert listing(place["tmp"]) == baseline and listing(place["out"]) == []
