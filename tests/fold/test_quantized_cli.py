"""`foldnorm fold --fold-through-qdq` and `foldnorm inspect` on a quantized model."""
import json

import onnx

from foldnorm.cli import main
from tests.fold.test_quantized import build


def test_fold_and_inspect_a_quantized_model(tmp_path, capsys):
    model, _ = build("Conv", through_qdq=True)
    source = tmp_path / "model.onnx"
    onnx.save(model, str(source))

    assert main(["inspect", str(source)]) == 0
    text = capsys.readouterr().out
    assert "left: its input comes from DequantizeLinear" in text and "--fold-through-qdq folds it there" in text
    assert main(["inspect", str(source), "--fold-through-qdq"]) == 0
    text = capsys.readouterr().out
    assert "folded into Conv: folded into the weight scales of Conv 'layer_node'" in text
    assert "int8 weight, per-channel; 6 channels rescaled; 2 negated" in text

    output, report = tmp_path / "folded.onnx", tmp_path / "report.json"
    assert main(["fold", str(source), "-o", str(output), "--report", str(report), "--fold-through-qdq"]) == 0
    text = capsys.readouterr().out
    assert "3 steps (max" in text
    written = json.loads(report.read_text())
    (outcome,) = written["outcomes"]
    assert outcome["quantized"]["through_qdq"] is True and outcome["quantized"]["weight"] == "int8"
    (comparison,) = written["verification"]["outputs"]
    assert comparison["step_tolerance"] == 3.0 and comparison["max_steps"] <= 3.0
    folded = onnx.load(str(output))
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)

    strict = main(["fold", str(source), "-o", str(tmp_path / "strict.onnx"), "--fold-through-qdq", "--steps", "0"])
    assert comparison["max_steps"] > 0 and strict == 1  # one rounding fewer moves some output by a step
    assert main(["fold", str(source), "-o", str(tmp_path / "bad.onnx"), "--steps", "-1"]) == 2
