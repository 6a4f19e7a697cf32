"""What keeps a big model's fold fast and small: external data read once and only when needed, checks
and shape inference on the model's structure alone, tensor data written one tensor at a time, and one
temporary folder. The 300 MB and over-2 GiB figures are in benchmarks/big_model.py."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from foldnorm.fold.verification.runner import verify  # in this process: the tests watch its steps
from foldnorm.fold import fold_model
from foldnorm.fold.session import ModelSession
from foldnorm.fold.io import external_data, modelio
from foldnorm.fold.verification import sessions
from foldnorm.fold.errors import FoldError
from foldnorm.fold.io.external_data import LARGE_TENSOR_ALIGNMENT, read_referenced_array
from foldnorm.fold.io.modelio import load_model, save_model, temporary_folder
from foldnorm.fold.quantized.steps import StepComparison
from tests.fold.fold_models import ModelBuilder, count_ops, run_ort


def conv_bn_model(channels=64, pairs=3, seed=0, tail=True):
    """(Conv 3x3 -> BN -> Relu) * pairs, then (tail) a Conv with no BN after it, which the fold never touches."""
    b = ModelBuilder(seed)
    x = b.input("x", [1, channels, 6, 6])
    for i in range(pairs):
        y = b.conv(x, channels, channels, 3, bias=True, name="conv%d" % i)
        x = b.relu(b.frozen_batch_norm(y, channels, name="bn%d" % i))
    if tail:
        x = b.conv(x, channels, channels, 3, name="tail")
    b.output(x, [1, channels, 6, 6])
    return b.model(opset=13)


def save_external(model, path):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model moves the data of the model it saves to external data
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path


def feeds(channels=64, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((1, channels, 6, 6)).astype(np.float32)}


def test_external_data_is_read_once_each_and_the_result_holds_all_its_data(tmp_path, monkeypatch):
    model = conv_bn_model()
    path = save_external(model, tmp_path / "model.onnx")
    reads = []
    real_read, real_map = external_data.read_external_bytes, external_data.map_external_array

    def counting_read(file, offset, length, name, where):
        reads.append(name)
        return real_read(file, offset, length, name, where)

    def counting_map(file, offset, count, dtype, name):
        reads.append(name)
        return real_map(file, offset, count, dtype, name)

    monkeypatch.setattr(external_data, "read_external_bytes", counting_read)
    monkeypatch.setattr(external_data, "map_external_array", counting_map)
    folded, report = fold_model(path, verify=False)
    external = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
                if t.data_location == TensorProto.EXTERNAL}
    assert sorted(reads) == sorted(external)  # each once, the untouched tail weight included
    assert "tail.weight" in reads
    assert not any(t.data_location == TensorProto.EXTERNAL for t in folded.graph.initializer)
    assert count_ops(folded, "BatchNormalization") == 0
    expected = run_ort(model, feeds())
    got = run_ort(folded, feeds())
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max())


def test_a_tensor_left_in_its_file_reads_as_onnx_reads_it(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {
        "f32": rng.standard_normal((7, 5)).astype(np.float32),
        "f16": rng.standard_normal(600).astype(np.float16),
        "f64": rng.standard_normal((3, 100)),
        "i64": rng.integers(-9, 9, 200),
        "u8": rng.integers(0, 255, 2000).astype(np.uint8),
        "flags": rng.random(1500) < 0.5,
    }
    b = ModelBuilder()
    for name, array in arrays.items():
        b.initializers.append(onnx.numpy_helper.from_array(array, name))
        b.node("Identity", [name], [name + "_out"])
        b.outputs.append(onnx.helper.make_tensor_value_info(name + "_out", b.initializers[-1].data_type,
                                                            array.shape))
    path = tmp_path / "model.onnx"
    onnx.save_model(b.model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="data.bin", size_threshold=0)
    opened = modelio.open_model(path, "path", in_place=True)
    for tensor in opened.model.graph.initializer:
        array = read_referenced_array(tensor)
        assert array.dtype == arrays[tensor.name].dtype
        np.testing.assert_array_equal(array, arrays[tensor.name])
    assert read_referenced_array(onnx.numpy_helper.from_array(arrays["f32"], "inline")) is None


def test_shape_inference_and_the_checker_never_see_the_tensor_data(tmp_path, monkeypatch):
    model = conv_bn_model(channels=96)
    path = save_external(model, tmp_path / "model.onnx")
    seen = []
    real_infer = onnx.shape_inference.infer_shapes

    def recording_infer(proto, *args, **kwargs):
        seen.append(proto.ByteSize())
        return real_infer(proto, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", recording_infer)
    folded, _ = fold_model(path, verify=False)
    weights = sum(t.ByteSize() for t in folded.graph.initializer)
    assert seen and max(seen) < weights / 50


def test_saving_writes_one_tensor_at_a_time(tmp_path):
    model = conv_bn_model(channels=128, pairs=4, tail=False)  # four 590 KB weights
    largest = max(len(t.raw_data) for t in model.graph.initializer)
    total = sum(len(t.raw_data) for t in model.graph.initializer)
    assert total > 3.5 * largest
    tracemalloc.start()
    try:
        save_model(model, tmp_path / "out.onnx", external_data=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * largest  # the whole model, serialized or copied as bytes, would be `total`
    loaded = load_model(tmp_path / "out.onnx")
    for before, after in zip(model.graph.initializer, loaded.graph.initializer):
        assert before.raw_data == after.raw_data


def test_large_tensors_start_where_onnxruntime_can_map_them(tmp_path, monkeypatch):
    monkeypatch.setattr(external_data, "LARGE_TENSOR_BYTES", 4096)
    model = conv_bn_model(channels=32, pairs=3, tail=False)  # 36 KB weights, 128-byte BN parameters
    save_model(model, tmp_path / "out.onnx", external_data=True)
    written = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    offsets = {}
    for tensor in written.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            info = {e.key: int(e.value) for e in tensor.external_data if e.key != "location"}
            offsets[tensor.name] = info["offset"]
    assert {n for n in offsets if n.endswith(".weight")} == {"conv0.weight", "conv1.weight", "conv2.weight"}
    assert all(offsets[n] % LARGE_TENSOR_ALIGNMENT == 0 for n in offsets if n.endswith(".weight"))
    assert all(offsets[n] % 64 == 0 for n in offsets)
    expected = run_ort(model, feeds(32))
    got = run_ort(load_model(tmp_path / "out.onnx"), feeds(32))
    np.testing.assert_array_equal(got[model.graph.output[0].name], expected[model.graph.output[0].name])


def test_a_model_past_the_protobuf_limit_folds_and_is_written_with_external_data(tmp_path, monkeypatch):
    model = conv_bn_model(channels=32)
    path = save_external(model, tmp_path / "model.onnx")
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", 20_000)
    monkeypatch.setattr(modelio, "IN_MEMORY_CHECK_BYTES", 0)
    folded, _ = fold_model(path, verify=False)
    written = save_model(folded, tmp_path / "out.onnx")
    assert written == [tmp_path / "out.onnx", tmp_path / "out.onnx.data"]
    expected = run_ort(model, feeds(32))
    got = run_ort(load_model(tmp_path / "out.onnx"), feeds(32))
    name = model.graph.output[0].name
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5 * np.abs(expected[name]).max())


def test_a_sessions_scratch_folder_holds_what_it_writes_and_goes_when_it_closes(tmp_path):
    path = save_external(conv_bn_model(channels=32), tmp_path / "model.onnx")
    with ModelSession(conv_bn_model(channels=32)) as in_memory, ModelSession(path) as from_file:
        for session in (in_memory, from_file):
            session.fold()
            assert session.verify().passed
        folders = [in_memory.scratch.folder, from_file.scratch.folder]
        assert folders[0] != folders[1]
        assert all(os.path.basename(folder).startswith("foldnorm-") for folder in folders)
        # the in-memory original goes to the verifying process as a file; a file's original is the file itself
        assert sorted(os.listdir(folders[0])) == ["folded", "original"]
        assert sorted(os.listdir(folders[1])) == ["folded"]
    assert not any(os.path.exists(folder) for folder in folders)
    with temporary_folder() as alone:
        assert os.path.basename(alone).startswith("foldnorm-")
    assert not os.path.exists(alone)


_PEAK_OF_A_CHILD = r"""
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"code": done.returncode, "err": done.stderr[-500:],
                  "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def _peak_bytes(argv):
    # glibc keeps freed blocks of a few MB for reuse instead of returning them (blocks past 32 MB, a big
    # model's weights, always go back): this threshold makes it return these too, so that the peak counts
    # what foldnorm holds, not what the allocator kept.
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**17))
    done = subprocess.run([sys.executable, "-c", _PEAK_OF_A_CHILD] + argv, capture_output=True, text=True,
                          check=True, env=environment)
    result = json.loads(done.stdout)
    assert result["code"] == 0, result["err"]
    return result["peak"]


def test_the_fold_command_holds_at_most_one_copy_of_the_model_beyond_its_start(tmp_path):
    tiny = save_external(conv_bn_model(channels=8, pairs=4, tail=False), tmp_path / "tiny.onnx")
    path = save_external(conv_bn_model(channels=384, pairs=4, tail=False), tmp_path / "model.onnx")  # 4 x 5.3 MB
    model_bytes = path.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size

    def fold_command(source):
        return [sys.executable, "-m", "foldnorm.cli", "fold", str(source), "-o", str(tmp_path / "out.onnx"),
                "--no-verify"]

    start = _peak_bytes(fold_command(tiny))  # the interpreter, the imports, the same steps
    peak = _peak_bytes(fold_command(path))
    # Before, the command held five copies (the loaded tensors, a copy to fold, the folded weights, the
    # old ones left in the folded copy, and a copy to save); now the folded weights and the weight in flight.
    assert peak - start < 2 * model_bytes, (peak, start, model_bytes)
    assert count_ops(onnx.load(str(tmp_path / "out.onnx")), "BatchNormalization") == 0


@pytest.mark.parametrize("external", [False, True])
def test_save_does_not_change_the_model(tmp_path, external):
    model = conv_bn_model(channels=32)
    before = model.SerializeToString()
    save_model(model, tmp_path / "out.onnx", external_data=external)
    assert model.SerializeToString() == before


def test_a_session_writes_the_folded_weights_from_the_arrays_themselves(tmp_path):
    model = conv_bn_model(channels=192, pairs=2)  # 1.3 MB weights: held as arrays
    path = save_external(model, tmp_path / "model.onnx")
    with ModelSession(path) as session:
        session.fold()
        assert len(session.held) == 2
        session.stage(tmp_path / "held.onnx")
        assert len(session.held) == 0  # written: let go
        assert session.commit() == [tmp_path / "held.onnx", tmp_path / "held.onnx.data"]
    plain, _ = fold_model(path, verify=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in plain.graph.initializer)
    save_model(plain, tmp_path / "plain.onnx", external_data=True)
    assert (tmp_path / "held.onnx.data").read_bytes() == (tmp_path / "plain.onnx.data").read_bytes()
    held_file = onnx.load(str(tmp_path / "held.onnx"), load_external_data=False)
    plain_file = onnx.load(str(tmp_path / "plain.onnx"), load_external_data=False)
    for a, b in zip(held_file.graph.initializer, plain_file.graph.initializer):  # the data files' names differ
        a.ClearField("external_data"), b.ClearField("external_data")
    assert held_file.graph == plain_file.graph
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert verify(path, tmp_path / "held.onnx").outputs[0].max_abs_error == \
        verify(path, plain).outputs[0].max_abs_error


# ------------------------------------------------------------------------------------------ verification

@pytest.fixture
def onnxruntime_sessions(monkeypatch):
    """Every onnxruntime session made while the test runs: what it was handed ("bytes" for a serialized
    model, else the path), the size of the external data file beside that path, and the most sessions alive
    at once."""
    import onnxruntime as ort

    seen = {"sources": [], "data_bytes": [], "alive": 0, "most_alive": 0}

    def closed():
        seen["alive"] -= 1

    class Recorded(ort.InferenceSession):
        def __init__(self, source, *args, **kwargs):
            super().__init__(source, *args, **kwargs)
            seen["sources"].append("bytes" if isinstance(source, bytes) else source)
            data = None if isinstance(source, bytes) else str(source) + ".data"
            seen["data_bytes"].append(os.path.getsize(data) if data and os.path.exists(data) else None)
            seen["alive"] += 1
            seen["most_alive"] = max(seen["most_alive"], seen["alive"])
            weakref.finalize(self, closed)

    monkeypatch.setattr(ort, "InferenceSession", Recorded)
    return seen


def count_reads(monkeypatch):
    """The names of the tensors whose external data foldnorm reads from now on."""
    reads = []
    real_read, real_map = external_data.read_external_bytes, external_data.map_external_array

    def counting_read(file, offset, length, name, where):
        reads.append(name)
        return real_read(file, offset, length, name, where)

    def counting_map(file, offset, count, dtype, name):
        reads.append(name)
        return real_map(file, offset, count, dtype, name)

    monkeypatch.setattr(external_data, "read_external_bytes", counting_read)
    monkeypatch.setattr(external_data, "map_external_array", counting_map)
    return reads


def test_verify_hands_onnxruntime_both_files_as_they_are(tmp_path, monkeypatch, onnxruntime_sessions):
    model = conv_bn_model(channels=192, pairs=3)
    path = save_external(model, tmp_path / "model.onnx")
    folded, _ = fold_model(path, verify=False)
    save_model(folded, tmp_path / "folded.onnx", external_data=True)
    reads = count_reads(monkeypatch)
    report = verify(path, tmp_path / "folded.onnx")
    assert reads == []  # neither model's tensors: onnxruntime reads them from the files
    # the original at its shape, the folded model, the original again for its rounding noise
    assert onnxruntime_sessions["sources"] == [str(path), str(tmp_path / "folded.onnx"), str(path)]
    assert onnxruntime_sessions["most_alive"] == 1
    monkeypatch.undo()
    in_memory = verify(model, folded)  # every tensor read by foldnorm, both models handed over serialized
    assert report.outputs[0].max_abs_error == in_memory.outputs[0].max_abs_error
    assert report.outputs[0].noise == in_memory.outputs[0].noise


def test_verify_validates_the_originals_external_data_before_onnxruntime_reads_it(tmp_path, onnxruntime_sessions):
    model = conv_bn_model(channels=32)
    folded, _ = fold_model(model, verify=False)
    save_external(model, tmp_path / "model.onnx")
    inner = tmp_path / "inner"
    inner.mkdir()
    climbing = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    for tensor in climbing.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../model.onnx.data"
    onnx.save_model(climbing, str(inner / "model.onnx"))
    with pytest.raises(FoldError, match="climbs out with '..'.*path traversal refused"):
        verify(inner / "model.onnx", folded)
    short = tmp_path / "short"
    short.mkdir()
    shutil.copy(tmp_path / "model.onnx", short / "model.onnx")
    (short / "model.onnx.data").write_bytes((tmp_path / "model.onnx.data").read_bytes()[:-100])
    with pytest.raises(FoldError, match="too short for tensor"):
        verify(short / "model.onnx", folded)
    assert onnxruntime_sessions["sources"] == []


def quantized_output_model(channels=32):
    """Conv -> BN -> QuantizeLinear -> DequantizeLinear per channel, as the graph output."""
    b = ModelBuilder(3)
    x = b.input("x", [1, channels, 6, 6])
    y = b.frozen_batch_norm(b.conv(x, channels, channels, 3, bias=True, name="conv"), channels, name="bn")
    scale = b.constant("scale", np.linspace(0.02, 0.05, channels).astype(np.float32))
    zero = b.constant("zero", np.zeros(channels, np.int8), np.int8)
    q = b.node("QuantizeLinear", [y, scale, zero], ["q"], axis=1)
    b.node("DequantizeLinear", [q, scale, zero], ["dq"], axis=1)
    b.output("dq", [1, channels, 6, 6])
    return b.model(opset=13)


def zero_dim_model():
    """conv_bn_model whose input declares its batch as 0 (dynamic to foldnorm, fixed to onnxruntime)."""
    model = conv_bn_model(channels=32)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    return model


@pytest.mark.parametrize("build", [quantized_output_model, zero_dim_model])
def test_a_model_onnxruntime_cannot_be_handed_as_it_is_is_read_whole(tmp_path, onnxruntime_sessions, build):
    model = build()
    path = tmp_path / "model.onnx"
    onnx.save_model(model.__deepcopy__(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)  # the quantization scales in the file too
    folded, _ = fold_model(path, verify=False)
    report = verify(path, folded)
    assert report.passed and str(path) not in onnxruntime_sessions["sources"]
    if build is quantized_output_model:
        assert isinstance(report.outputs[0], StepComparison) and report.outputs[0].max_steps <= 1.0
    else:
        assert report.dynamic_dims == {"x": [0]}
    expected = verify(model, folded)
    assert report.outputs[0].max_abs_error == expected.outputs[0].max_abs_error


# 256 channels: the quantization scale is 1 KiB, which a copy of the structure would leave out
@pytest.mark.parametrize("build", [conv_bn_model, lambda: quantized_output_model(channels=256)],
                         ids=["float", "quantized"])
def test_a_large_model_file_without_external_data_is_handed_over_as_it_is(tmp_path, monkeypatch,
                                                                          onnxruntime_sessions, build):
    monkeypatch.setattr(sessions, "FILE_SOURCE_BYTES", 0)  # every model counts as large
    model = build()
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    folded, _ = fold_model(path, verify=False)
    report = verify(path, folded)
    assert report.passed and onnxruntime_sessions["sources"][0] == str(path)
    assert report.outputs[0].max_abs_error == verify(model, folded).outputs[0].max_abs_error


def test_a_large_model_in_memory_is_written_once_for_all_its_sessions(monkeypatch, onnxruntime_sessions):
    original = conv_bn_model(channels=32)
    folded, _ = fold_model(original, verify=False)
    expected = verify(original, folded)
    assert onnxruntime_sessions["sources"] == ["bytes"] * 3
    monkeypatch.setattr(sessions, "FILE_SOURCE_BYTES", 0)  # every model counts as large
    written = []
    real_write = sessions.ModelSource._write

    def recording_write(source, model):
        written.append(real_write(source, model))
        return written[-1]

    monkeypatch.setattr(sessions.ModelSource, "_write", recording_write)
    report = verify(original, folded)
    assert len(written) == 2  # the original for both its sessions, the folded model for its one
    assert onnxruntime_sessions["sources"][3:] == [written[0], written[1], written[0]]
    assert onnxruntime_sessions["most_alive"] == 1
    assert report.outputs[0].max_abs_error == expected.outputs[0].max_abs_error
    assert not any(os.path.exists(path) for path in written)


def test_the_verified_fold_command_holds_the_folded_model_and_one_session_at_most(tmp_path):
    tiny = save_external(conv_bn_model(channels=8, pairs=4, tail=False), tmp_path / "tiny.onnx")
    path = save_external(conv_bn_model(channels=384, pairs=4, tail=False), tmp_path / "model.onnx")  # 4 x 5.3 MB
    model_bytes = path.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size

    def fold_command(source):
        return [sys.executable, "-m", "foldnorm.cli", "fold", str(source), "-o", str(tmp_path / "out.onnx")]

    start = _peak_bytes(fold_command(tiny))  # the interpreter, the imports, onnxruntime, the same steps
    peak = _peak_bytes(fold_command(path))
    # The largest process holds one model at a time: the command the folded weights until they are written,
    # the verifying process one session at a time, each mapped from its file; its last session, the original
    # with every optimization on (the model's noise, which a model past NOISE_ALWAYS_BYTES skips), holds
    # onnxruntime's prepacked weights beside the original ones. Before, one process read the original again
    # and handed each model to onnxruntime serialized: four copies at once.
    assert peak - start < 3 * model_bytes, (peak, start, model_bytes)
    assert count_ops(onnx.load(str(tmp_path / "out.onnx")), "BatchNormalization") == 0
