"""The command over the model session: a crash of the verifying process, a report that cannot be written,
the BN default and its flags, initializers listed as inputs, a bit-flipped external data location."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import onnx

from foldnorm.cli import main
from tests.fold.fold_models import ModelBuilder, count_ops, max_relative_error, random_feeds
from tests.fold.test_session import float64_conv_bn, opset_7_batch_norm_with_five_outputs, parameters_as_inputs

ROOT = Path(__file__).resolve().parents[1]


def pre_activation_model():
    """x -> BN -> Relu -> Conv -> BN: the first BN has no layer to fold into, the second folds into the Conv."""
    b = ModelBuilder(8)
    x = b.input("x", [1, 3, 6, 6])
    b.batch_norm(x, "n", 3, name="pre_bn")
    b.node("Relu", ["n"], ["r"])
    b.node("Conv", ["r", b.weight("w", [4, 3, 3, 3])], ["c"], name="conv")
    b.batch_norm("c", "y", 4, name="post_bn")
    b.output("y", [1, 4, 4, 4])
    return b.model()


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def command(*argv, python=None, limits=None):
    """`foldnorm` in a process of its own (its verifying process started by `python` when given)."""
    if python is None:
        code = "import sys; from foldnorm.cli import main; sys.exit(main(sys.argv[1:]))"
    else:
        code = ("import sys; sys.executable = %r; from foldnorm.cli import main; sys.exit(main(sys.argv[1:]))"
                % str(python))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code] + [str(a) for a in argv], capture_output=True, text=True,
                          env=environment, preexec_fn=limits)


def test_keep_bn_is_the_default_and_rewrite_bn_its_opposite(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    onnx.save_model(pre_activation_model(), str(path))
    for flags, expected in (([], ["BatchNormalization", "Relu", "Conv"]),
                            (["--keep-bn"], ["BatchNormalization", "Relu", "Conv"]),
                            (["--rewrite-bn"], ["Mul", "Add", "Relu", "Conv"])):
        code, out, err = run_cli(capsys, "fold", path, "-o", tmp_path / "out.onnx", *flags)
        assert code == 0, err
        folded = onnx.load(str(tmp_path / "out.onnx"))
        assert [n.op_type for n in folded.graph.node] == expected
        assert max_relative_error(pre_activation_model(), folded, random_feeds(folded)) < 1e-5
    code, out, _ = run_cli(capsys, "fold", path, "--no-verify", "-o", tmp_path / "out.onnx")
    assert "kept as BatchNormalization" in out and "(--rewrite-bn rewrites it anyway)" in out
    code, _, err = run_cli(capsys, "fold", path, "--keep-bn", "--rewrite-bn")
    assert code == 2 and "not allowed with argument" in err


def test_fold_input_initializers_on_the_command_line(tmp_path, capsys):
    model, params = parameters_as_inputs(initializer_defaults=True)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "(--fold-input-initializers treats them as constants)" in out
    code, out, err = run_cli(capsys, "fold", path, "-o", tmp_path / "out.onnx", "--fold-input-initializers",
                             "--report", tmp_path / "report.json")
    assert code == 0, err
    folded = onnx.load(str(tmp_path / "out.onnx"))
    assert [i.name for i in folded.graph.input] == ["x"] and count_ops(folded, "BatchNormalization") == 0
    assert "removed them from the inputs (--fold-input-initializers)" in out
    assert "(--fold-input-initializers)" in (tmp_path / "report.json").read_text()


def test_the_reference_evaluator_verifies_a_float64_model_and_the_report_says_so(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    onnx.save_model(float64_conv_bn(), str(path))
    code, out, err = run_cli(capsys, "fold", path, "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert "verification against onnx's reference evaluator: passed" in out
    assert count_ops(onnx.load(str(tmp_path / "out.onnx")), "BatchNormalization") == 0


def test_a_crash_of_the_verifying_process_is_one_line_and_leaves_nothing(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(opset_7_batch_norm_with_five_outputs(), str(path))
    # The verifying process dies by a real segmentation fault where onnxruntime would run.
    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crashing.chmod(crashing.stat().st_mode | stat.S_IXUSR)
    done = command("fold", path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "report.json",
                   python=crashing)
    assert done.returncode == 2
    assert done.stderr == ("foldnorm: error: verifying %s: the verifying process (onnxruntime) was killed by "
                           "SIGSEGV\n" % path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashing-python", "model.onnx"]
    # The same model, verified for real: onnxruntime runs it (training mode, the BN left as it is).
    done = command("fold", path, "-o", tmp_path / "out.onnx")
    assert done.returncode == 0, done.stderr
    assert "verification against onnxruntime (graph optimizations disabled): passed" in done.stdout


def test_a_report_that_cannot_be_written_leaves_no_model_either(tmp_path):
    import resource

    path = tmp_path / "model.onnx"
    onnx.save_model(pre_activation_model(), str(path))
    done = command("fold", path, "--no-verify", "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    model_size, report_size = (tmp_path / "out.onnx").stat().st_size, (tmp_path / "r.json").stat().st_size
    assert done.returncode == 0 and model_size < report_size
    os.unlink(tmp_path / "out.onnx"), os.unlink(tmp_path / "r.json")
    limit = (model_size + report_size) // 2

    def small_files():  # the model fits, the report does not: as when the disk fills up between them
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = command("fold", path, "--no-verify", "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json",
                   limits=small_files)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot write" in done.stderr and "r.json" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_bit_flipped_external_data_location_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    onnx.save_model(pre_activation_model(), str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    path.write_bytes(path.read_bytes().replace(b"weights.bin", b"weig\xffts.bin", 1))
    code, out, err = run_cli(capsys, "fold", path)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "keeps its data at b'weig\\xffts.bin', which is not a valid file name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "weights.bin"]
