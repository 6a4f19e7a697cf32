"""foldnorm.modelio: every file we refuse, external data that stays inside the model's folder, atomic writes."""
import os
import stat

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldnorm import verify
from foldnorm.fold.io import external_data, modelio
from foldnorm.fold.errors import FoldError
from foldnorm.fold.io.modelio import external_data_files, load_model, save_model, uses_external_data
from tests.onnx_cases import IR_VERSION

OPSET = 17


def conv_bn_model(opset=OPSET, channels=16, seed=0):
    """Conv -> BatchNormalization with weights large enough (> 1 KiB) to be written as external data."""
    rng = np.random.default_rng(seed)
    params = {
        "w": rng.standard_normal((channels, 3, 3, 3)).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "bias": rng.standard_normal(channels).astype(np.float32),
        "mean": rng.standard_normal(channels).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])],
        initializer=[numpy_helper.from_array(a, n) for n, a in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="modelio-test")
    model.ir_version = IR_VERSION
    return model, params


def initializer_arrays(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def save_with_external_data(model, path, location="weights.bin"):
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def set_location(model_path, location, tensor="w"):
    """Rewrite one tensor's external location in a saved model file (without touching the data)."""
    model = onnx.load(str(model_path), load_external_data=False)
    for t in model.graph.initializer:
        if t.name == tensor:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
    model_path.write_bytes(model.SerializeToString())


def folder_listing(folder):
    return sorted(os.listdir(folder))


# ---- load_model: what it refuses ------------------------------------------------------------------------

def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(FoldError, match="nope.onnx: no such file"):
        load_model(tmp_path / "nope.onnx")


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(FoldError, match="is a directory, not an ONNX model file"):
        load_model(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"hello, this is plainly text\n", "not an ONNX model, or it is truncated or corrupted"),
    (b'{"graph": []}', "not an ONNX model, or it is truncated or corrupted"),
    (b"\x08\x07", r"not an ONNX model \(it has no graph\)"),
])
def test_files_that_are_not_onnx_are_refused(tmp_path, content, message):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(FoldError, match=message):
        load_model(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_a_truncated_model_is_refused(tmp_path, keep):
    data = conv_bn_model()[0].SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(FoldError, match="model.onnx is not an ONNX model, or it is truncated or corrupted"):
        load_model(path)


def test_a_corrupted_model_is_refused(tmp_path):
    data = bytearray(conv_bn_model()[0].SerializeToString())
    graph_field = data.index(b"\x3a")  # field 7 (graph), length-delimited: make its length overrun the file
    data[graph_field + 1: graph_field + 3] = b"\xff\xff"
    path = tmp_path / "model.onnx"
    path.write_bytes(bytes(data))
    with pytest.raises(FoldError, match="truncated or corrupted"):
        load_model(path)


def test_a_model_the_checker_rejects_is_refused(tmp_path):
    model, _ = conv_bn_model()
    model.graph.node[1].input[0] = "never_produced"
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    message = "model.onnx is not a valid ONNX model; the ONNX checker rejects it: .*never_produced"
    with pytest.raises(FoldError, match=message):
        load_model(path)


@pytest.mark.parametrize("opset, message", [
    (6, "uses ai.onnx opset 6; foldnorm supports opsets 7 to"),
    (onnx.defs.onnx_opset_version() + 1, "newer than the installed onnx knows"),
])
def test_an_unsupported_opset_is_refused(tmp_path, opset, message):
    model, _ = conv_bn_model()
    model.opset_import[0].version = opset
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(FoldError, match=message):
        load_model(path)


def test_every_refusal_is_one_line(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"garbage")
    with pytest.raises(FoldError) as caught:
        load_model(path)
    assert "\n" not in str(caught.value)


# ---- load_model: a good model and external data ------------------------------------------------------------

def test_a_plain_model_loads_unchanged(tmp_path):
    model, _ = conv_bn_model()
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    loaded = load_model(path)
    assert loaded.SerializeToString() == model.SerializeToString()
    assert not uses_external_data(path) and not uses_external_data(loaded)


def test_external_data_is_loaded_into_the_model(tmp_path):
    model, params = conv_bn_model()
    save_with_external_data(model, tmp_path / "model.onnx")
    loaded = load_model(tmp_path / "model.onnx")
    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.graph.initializer)
    arrays = initializer_arrays(loaded)
    for name, array in params.items():
        np.testing.assert_array_equal(arrays[name], array)
    assert uses_external_data(tmp_path / "model.onnx")
    assert external_data_files(tmp_path / "model.onnx") == {os.path.realpath(tmp_path / "weights.bin")}


def test_external_data_in_a_subfolder_and_through_an_inner_symlink_is_allowed(tmp_path):
    model, params = conv_bn_model()
    (tmp_path / "data").mkdir()
    save_with_external_data(model, tmp_path / "model.onnx", location="data/weights.bin")
    assert np.array_equal(initializer_arrays(load_model(tmp_path / "model.onnx"))["w"], params["w"])
    os.symlink("data/weights.bin", tmp_path / "alias.bin")
    set_location(tmp_path / "model.onnx", "alias.bin")
    assert np.array_equal(initializer_arrays(load_model(tmp_path / "model.onnx"))["w"], params["w"])


@pytest.fixture
def model_and_outside_data(tmp_path):
    """A model in tmp/model/ with external data, and a valid copy of that data OUTSIDE the folder."""
    folder = tmp_path / "model"
    folder.mkdir()
    save_with_external_data(conv_bn_model()[0], folder / "model.onnx")
    outside = tmp_path / "outside.bin"
    outside.write_bytes((folder / "weights.bin").read_bytes())
    return folder, outside


def refused_before_reading(monkeypatch, path, message):
    reads = []
    monkeypatch.setattr(external_data, "read_external_bytes", lambda *args: reads.append(args))
    with pytest.raises(FoldError, match=message):
        load_model(path)
    assert reads == [], "external data was read before the traversal was refused"


def test_an_absolute_location_is_refused_before_reading(monkeypatch, model_and_outside_data):
    folder, outside = model_and_outside_data
    set_location(folder / "model.onnx", str(outside), tensor="var")
    refused_before_reading(monkeypatch, folder / "model.onnx",
                           r"tensor 'var' keeps its data at '.*outside.bin', an absolute path.*path traversal refused")


def test_a_dotdot_location_is_refused_before_reading(monkeypatch, model_and_outside_data):
    folder, _ = model_and_outside_data
    set_location(folder / "model.onnx", "../outside.bin", tensor="var")
    refused_before_reading(monkeypatch, folder / "model.onnx", r"'\.\./outside.bin', which climbs out with '\.\.'")
    set_location(folder / "model.onnx", "sub/../../outside.bin", tensor="var")
    refused_before_reading(monkeypatch, folder / "model.onnx", "climbs out")


def test_a_symlink_out_of_the_folder_is_refused_before_reading(monkeypatch, model_and_outside_data):
    folder, outside = model_and_outside_data
    os.symlink(outside, folder / "link.bin")
    set_location(folder / "model.onnx", "link.bin", tensor="var")
    refused_before_reading(monkeypatch, folder / "model.onnx", "a symlink that points outside the model's folder")


def test_missing_external_data_is_refused(tmp_path):
    save_with_external_data(conv_bn_model()[0], tmp_path / "model.onnx")
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(FoldError, match="the external data file 'weights.bin' of tensor 'w' is missing"):
        load_model(tmp_path / "model.onnx")


def test_external_data_shorter_than_its_tensors_is_refused(tmp_path):
    save_with_external_data(conv_bn_model()[0], tmp_path / "model.onnx")
    data = (tmp_path / "weights.bin").read_bytes()
    (tmp_path / "weights.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(FoldError, match="too short for tensor"):
        load_model(tmp_path / "model.onnx")


# ---- save_model ------------------------------------------------------------------------------------------

def test_save_writes_the_model_and_nothing_else(tmp_path):
    model, _ = conv_bn_model()
    before = model.SerializeToString()
    assert save_model(model, tmp_path / "out.onnx") == [tmp_path / "out.onnx"]
    assert (tmp_path / "out.onnx").read_bytes() == before
    assert folder_listing(tmp_path) == ["out.onnx"]
    assert model.SerializeToString() == before


def test_save_keeps_an_existing_files_permissions(tmp_path):
    path = tmp_path / "out.onnx"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    save_model(conv_bn_model()[0], path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_save_with_external_data_writes_weights_beside_the_output(tmp_path):
    model, params = conv_bn_model()
    before = model.SerializeToString()
    written = save_model(model, tmp_path / "out.onnx", external_data=True)
    assert written == [tmp_path / "out.onnx", tmp_path / "out.onnx.data"]
    assert model.SerializeToString() == before
    assert folder_listing(tmp_path) == ["out.onnx", "out.onnx.data"]
    written = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    external = {t.name for t in written.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"w"}  # 1728 bytes; the 64-byte BN parameters stay inline
    locations = {e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    loaded = load_model(tmp_path / "out.onnx")
    for name, array in params.items():
        np.testing.assert_array_equal(initializer_arrays(loaded)[name], array)
    assert verify(model, tmp_path / "out.onnx").outputs[0].max_abs_error == 0.0


def test_a_model_over_the_protobuf_limit_is_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", 100)
    model, params = conv_bn_model()
    save_model(model, tmp_path / "big.onnx")
    assert folder_listing(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert uses_external_data(tmp_path / "big.onnx")


def test_external_data_tensors_stored_in_typed_fields_are_converted(tmp_path):
    values = np.random.default_rng(1).standard_normal(600).astype(np.float16)
    tensor = helper.make_tensor("h", TensorProto.FLOAT16, values.shape, values.tolist())  # int32_data, not raw
    assert not tensor.HasField("raw_data")
    model, _ = conv_bn_model()
    model.graph.initializer.append(tensor)
    model.graph.node.append(helper.make_node("Identity", ["h"], ["h_out"]))
    model.graph.output.append(helper.make_tensor_value_info("h_out", TensorProto.FLOAT16, [600]))
    save_model(model, tmp_path / "out.onnx", external_data=True)
    np.testing.assert_array_equal(initializer_arrays(load_model(tmp_path / "out.onnx"))["h"], values)


@pytest.mark.parametrize("failing", ["os.fsync", "os.replace"])
@pytest.mark.parametrize("external_data", [False, True])
def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, failing, external_data):
    path = tmp_path / "out.onnx"
    path.write_bytes(b"previous result")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing.split(".")[1], fail)
    with pytest.raises(FoldError, match=r"cannot write .*out.onnx(.data)?: No space left on device"):
        save_model(conv_bn_model()[0], path, external_data=external_data)
    monkeypatch.undo()
    assert folder_listing(tmp_path) == ["out.onnx"]
    assert path.read_bytes() == b"previous result"


def test_a_failed_model_rename_puts_the_previous_data_file_back(tmp_path, monkeypatch):
    save_model(conv_bn_model(seed=1)[0], tmp_path / "out.onnx", external_data=True)
    previous = {name: (tmp_path / name).read_bytes() for name in folder_listing(tmp_path)}
    real_replace = os.replace

    def replace_all_but_the_model(source, destination):
        if str(destination).endswith("out.onnx"):
            raise OSError(5, "Input/output error")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_all_but_the_model)
    with pytest.raises(FoldError, match="out.onnx: Input/output error"):
        save_model(conv_bn_model(seed=2)[0], tmp_path / "out.onnx", external_data=True)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in folder_listing(tmp_path)} == previous
    assert np.array_equal(initializer_arrays(load_model(tmp_path / "out.onnx"))["w"], conv_bn_model(seed=1)[1]["w"])


def test_save_into_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(FoldError, match="does not exist"):
        save_model(conv_bn_model()[0], tmp_path / "no" / "out.onnx")
    with pytest.raises(FoldError, match="is a directory"):
        save_model(conv_bn_model()[0], tmp_path)


def test_unloaded_external_data_cannot_be_saved(tmp_path):
    save_with_external_data(conv_bn_model()[0], tmp_path / "model.onnx")
    unloaded = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert uses_external_data(unloaded)
    with pytest.raises(FoldError, match="never loaded"):
        save_model(unloaded, tmp_path / "out.onnx")


# ---- tensors everywhere: copies without data, and their round trip ---------------------------------------

def model_with_tensors_everywhere():
    """Large tensors in an initializer, a Constant node, an If branch's Constant, a sparse initializer and
    a local function's Constant, beside small ones that stay inline."""
    rng = np.random.default_rng(5)
    big = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c_branch"], value=numpy_helper.from_array(big(400), "c_branch")),
         helper.make_node("Add", ["x_flat", "c_branch"], ["branch_out"])],
        "branch", [], [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [400])])
    function = helper.make_function(
        "local", "AddConstant", ["a"], ["b"],
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(big(400), "k")),
         helper.make_node("Add", ["a", "k"], ["b"])],
        opset_imports=[helper.make_opsetid("", OPSET)])
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(big(300), "s"),
                                       numpy_helper.from_array(np.arange(0, 600, 2, dtype=np.int64), "s_idx"),
                                       [600])
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["x_flat"]),
        helper.make_node("Constant", [], ["c_main"], value=numpy_helper.from_array(big(400), "c_main")),
        helper.make_node("Add", ["x_flat", "c_main"], ["a1"]),
        helper.make_node("Add", ["a1", "w"], ["a2"]),
        helper.make_node("AddConstant", ["a2"], ["a3"], domain="local"),
        helper.make_node("If", ["cond"], ["a4"], then_branch=branch, else_branch=branch),
        helper.make_node("Add", ["a3", "a4"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "everywhere",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [20, 20]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [400])],
        initializer=[numpy_helper.from_array(big(400), "w"),
                     numpy_helper.from_array(np.array([400], dtype=np.int64), "shape")],
        sparse_initializer=[sparse])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("local", 1)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_copy_without_data_keeps_everything_but_the_large_tensors_data():
    model = model_with_tensors_everywhere()
    stripped = external_data.without_data(model)
    moved = [t for t in external_data.all_tensors(stripped) if t.data_location == TensorProto.EXTERNAL]
    # A sparse tensor stays whole: the checker's full check cannot read its indices from a file.
    assert sorted(t.name for t in moved) == ["c_branch", "c_branch", "c_main", "k", "w"]
    assert all(not t.raw_data and not t.float_data for t in moved)
    kept = {t.name: t for t in external_data.all_tensors(stripped) if t.data_location != TensorProto.EXTERNAL}
    assert numpy_helper.to_array(kept["shape"]).tolist() == [400]
    assert stripped.ByteSize() < model.ByteSize() / 2
    # Everything else is as it was: the same model once each moved tensor's data is put back.
    originals = iter(list(external_data.all_tensors(model)))
    for tensor in external_data.all_tensors(stripped):
        original = next(originals)
        if tensor.data_location == TensorProto.EXTERNAL:
            tensor.CopyFrom(original)
    assert stripped.SerializeToString() == model.SerializeToString()


def test_every_tensor_survives_the_round_trip_through_external_data(tmp_path):
    model = model_with_tensors_everywhere()
    save_model(model, tmp_path / "out.onnx", external_data=True)
    written = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    assert sum(t.data_location == TensorProto.EXTERNAL for t in external_data.all_tensors(written)) == 5
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    loaded = load_model(tmp_path / "out.onnx")
    for before, after in zip(external_data.all_tensors(model), external_data.all_tensors(loaded)):
        np.testing.assert_array_equal(numpy_helper.to_array(after), numpy_helper.to_array(before))
    assert verify(model, tmp_path / "out.onnx").outputs[0].max_abs_error == 0.0
