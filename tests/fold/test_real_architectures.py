"""The fold pass on a corpus of real architectures (tests/fold/architectures.py), exported the ways users
export: the TorchScript exporter (training=PRESERVE, dynamic batch, height and width) and the dynamo
exporter (optimize=False, which writes each Conv bias as a small constant sub-graph).

Each network is exported once per session. The folded model must match the torch module's own output at
two input sizes, keep only the BatchNormalization no layer can take, and fold every one that onnxruntime's own
basic-level optimizer removes.
"""
import pytest

from tests.fold.fold_models import count_ops

torch = pytest.importorskip("torch")

from tests.fold.architectures import ARCHITECTURES, EXPORTERS, corpus_row  # noqa: E402

TOLERANCE = 1e-4  # max|folded - torch| / max|torch|; the exports themselves are within ~1e-6
# BatchNormalization nodes that stay as they are: DenseNet's pre-activation BNs read a Concat whose inputs
# every later layer reads too, and write a ReLU; no layer can take them (onnxruntime leaves them as well),
# and as Mul/Add they would run slower.
LEFT = {"densenet": 6}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rows = {}

    def row(name, exporter):
        if exporter == "dynamo":
            pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
        if (name, exporter) not in rows:
            rows[name, exporter] = corpus_row(name, exporter, str(folder))  # no shapes: verification picks them
        return rows[name, exporter]

    return row


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_folds_and_matches_torch(corpus, name, exporter):
    row = corpus(name, exporter)
    report = row["report"]
    assert report.verification is not None and report.verification.passed
    assert report.verification.shapes_chosen and len(report.verification.shape_sets) == 2
    assert row["batch_norms"] == count_ops(row["original"], "BatchNormalization") > 0
    assert row["left"] == LEFT.get(name, 0) and row["rewritten"] == 0
    assert row["folded_count"] == row["batch_norms"] - row["left"]
    assert count_ops(row["folded"], "BatchNormalization") == row["left"]
    assert row["shapes"][0] != row["shapes"][1]
    for error, export_error in zip(row["errors"], row["export_errors"]):
        assert export_error < TOLERANCE, "the export itself differs from torch"
        assert error < TOLERANCE


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_batch_norm_a_peer_removes_is_folded(corpus, name, exporter):
    row = corpus(name, exporter)
    folded = {o.node for o in row["report"].outcomes if o.action == "folded"}
    if exporter == "torchscript":  # the dynamo export's computed Conv biases keep the peer from fusing any
        assert row["peer_removed"], "onnxruntime's basic optimizer removed no BatchNormalization"
    assert row["peer_removed"] <= folded


def test_token_mlp_folds_through_the_transposes_and_the_flatten(corpus):
    row = corpus("token_mlp", "torchscript")
    into = sorted((o.into, o.direction) for o in row["report"].outcomes)
    # the patch BN into its Conv; both BatchNorm1d over tokens into their MatMul through a Transpose (one
    # Linear has a bias Add between); the head BN through a Flatten into the 1x1 Conv before it
    assert into == [("Conv", "backward")] * 2 + [("MatMul", "backward")] * 2
    reasons = [o.reason for o in row["report"].outcomes if o.into == "MatMul"]
    assert all("through Transpose" in reason for reason in reasons)
    assert count_ops(row["folded"], "Mul") == 0
