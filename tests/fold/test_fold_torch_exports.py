"""The fold pass on models exported from PyTorch the way a user exports them.

Each model is a small torch.nn network with seeded random weights and non-trivial BatchNorm statistics
(every BN's weight, bias, running_mean and running_var random, the variance positive), put in eval mode
and written to a file by torch.onnx.export -- the TorchScript-based exporter (dynamo=False) with
training=PRESERVE, without which the exporter folds Conv+BatchNorm itself in eval mode and leaves
nothing to fold. The file is folded with fold_model(path, verify=True), and the folded model, run in
onnxruntime, is compared with the ORIGINAL torch module's eval output on the same input.

Beyond the model table (at opsets 7, 9, 13, 17): a dynamic batch axis, an export without constant
folding, weights kept as graph inputs, BatchNorm without running statistics, scripted control flow (If),
and modules exported as ONNX local functions, which the pass inlines to fold.

torch is an optional peer: without it the module is skipped; so is a case whose export raises.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from foldnorm.fold import fold_model
from tests.fold.fold_models import count_ops, outcome, run_ort

torch = pytest.importorskip("torch")
nn = torch.nn

OPSETS = (7, 9, 13, 17)  # 7: the exporter writes IR 3, where every initializer is also a graph input
FLOAT32_TOLERANCE = 1e-4  # max|folded - torch| / max|torch|


# ---------------------------------------------------------------------- the models


class BasicBlock(nn.Module):
    """ResNet's basic block: Conv-BN-ReLU, Conv-BN, a 1x1 Conv+BN shortcut when the shape changes."""

    def __init__(self, channels_in, channels_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.downsample = None
        if stride != 1 or channels_in != channels_out:
            self.downsample = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(y + shortcut)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise (groups = channels), 1x1 linear projection."""

    def __init__(self, channels_in, channels_out, stride, expand):
        super().__init__()
        hidden = channels_in * expand
        self.residual = stride == 1 and channels_in == channels_out
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden, eps=1e-3), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden, eps=1e-3),
            nn.ReLU6(),
            nn.Conv2d(hidden, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out, eps=1e-3))

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 12, 2, 3),
                                    InvertedResidual(12, 12, 1, 2))
        self.head = nn.Sequential(nn.Conv2d(12, 24, 1, bias=False), nn.BatchNorm2d(24, eps=1e-3), nn.ReLU6())
        self.classifier = nn.Linear(24, 5)

    def forward(self, x):
        return self.classifier(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class Decoder(nn.Module):
    """Upsampling by ConvTranspose2d + BatchNorm2d: stride 2 with a bias, grouped with output_padding,
    depthwise."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(8, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 6, 3, 2, 1, output_padding=1, groups=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.ConvTranspose2d(6, 6, 3, 1, 1, groups=6), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 3, 1))

    def forward(self, x):
        return self.net(x)


class MLP(nn.Module):
    """A tabular MLP: BatchNorm1d on the raw features, then Linear + BatchNorm1d (the second Linear has
    no bias, which the exporter writes as MatMul rather than Gemm)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm1d(16),
            nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Linear(32, 24, bias=False), nn.BatchNorm1d(24), nn.ReLU(),
            nn.Linear(24, 5))

    def forward(self, x):
        return self.net(x)


class PreActivation(nn.Module):
    """Pre-activation residual block (BN-ReLU-Conv): no BN here follows a layer it could fold back into
    alone."""

    def __init__(self):
        super().__init__()
        self.bn_input = nn.BatchNorm2d(4)
        self.conv_input = nn.Conv2d(4, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(8)
        self.conv_out = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        x = self.conv_input(self.bn_input(x))      # BN on the graph input, read by a padded Conv
        y = self.conv1(torch.relu(self.bn1(x)))    # its input also feeds the residual Add
        y = self.conv2(torch.relu(self.bn2(y)))    # conv1 feeds only this BN
        return self.conv_out(self.bn_out(x + y))   # read only by an unpadded 1x1 Conv


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(),
                                 nn.Conv1d(6, 6, 3, groups=3, bias=False), nn.BatchNorm1d(6))

    def forward(self, x):
        return self.net(x)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                                 nn.Conv3d(4, 4, 3, stride=2, groups=2, bias=False), nn.BatchNorm3d(4))

    def forward(self, x):
        return self.net(x)


class BatchStatistics(nn.Module):
    """BatchNorm2d(track_running_stats=False) normalizes with the batch's own statistics even in eval
    mode: nothing to fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Branches(nn.Module):
    """Data-dependent control flow, scripted: the exporter writes an If with a Conv+BN in each branch."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(3, 4, 3)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        if bool(x.sum() > 0):
            return self.bn_a(self.conv_a(x))
        return torch.relu(self.bn_b(self.conv_b(x)))


def randomized(module, seed=0):
    """The module in eval mode with seeded weights (std 1/sqrt(fan_in)) and BN statistics far from the
    identity: weight in [0.25, 1.75), bias and running_mean N(0, 0.5^2), running_var in [0.1, 2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            fan_in = parameter[0].numel() if parameter.dim() > 1 else 10
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in ** 0.5)
        for bn in module.modules():
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            channels = bn.num_features
            bn.weight.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.25)
            bn.bias.copy_(torch.randn(channels, generator=generator) * 0.5)
            if bn.track_running_stats:
                bn.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
                bn.running_var.copy_(torch.rand(channels, generator=generator) * 1.9 + 0.1)
    return module.eval()


@dataclass(frozen=True)
class Case:
    """A model, its input shape, and what the pass must do to it (the same at every opset)."""

    build: type
    input_shape: tuple
    batch_norms: int  # BatchNormalization nodes the exporter writes
    folded: dict      # {into: count}, as FoldReport.counts() gives it
    rewritten: int = 0
    left: int = 0
    nodes_added: int = 0  # the Mul and Add of each rewrite, the bias Add of a bias-less MatMul


CASES = {
    "resnet": Case(ResNet, (2, 3, 16, 16), 6, {"Conv": 6}),
    "mobilenet_v2": Case(MobileNetV2, (2, 3, 16, 16), 11, {"Conv": 11}),
    "conv_transpose_decoder": Case(Decoder, (2, 8, 4, 4), 3, {"ConvTranspose": 3}),
    "mlp_batchnorm1d": Case(MLP, (4, 16), 3, {"Gemm (forward)": 1, "Gemm": 1, "MatMul": 1}, nodes_added=1),
    "pre_activation": Case(PreActivation, (2, 4, 8, 8), 4, {"Conv": 1, "Conv (forward)": 1}, left=2),
    "conv1d": Case(Conv1dNet, (2, 3, 12), 2, {"Conv": 2}),
    "conv3d": Case(Conv3dNet, (2, 2, 6, 6, 6), 2, {"Conv": 2}),
}


# ---------------------------------------------------------------------- export, run, compare


def export(module, example, path, opset, **options):
    """torch.onnx.export as a user calls it to keep BatchNormalization; skips when the exporter fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and constant-folding notices
            torch.onnx.export(module, (example,), str(path), opset_version=opset, dynamo=False,
                              training=torch.onnx.TrainingMode.PRESERVE, **options)
    except Exception as error:
        pytest.skip("torch.onnx.export (dynamo=False) does not work in this environment: %s: %s"
                    % (type(error).__name__, str(error).splitlines()[0] if str(error) else ""))
    return onnx.load(str(path))


def example_input(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def error_against_torch(model, module, x):
    """max|onnx - torch| / max|torch| of the model run in onnxruntime against the module's eval output."""
    with torch.no_grad():
        expected = module(x).numpy().astype(np.float64)
    (name,) = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    (actual,) = run_ort(model, {name: x.numpy()}).values()
    assert actual.shape == expected.shape and actual.dtype == np.float32
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def constant_arrays(model):
    """{name: array} of the initializers and Constant nodes (IR 3 writes folded constants as nodes)."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return arrays


def computing_nodes(model):
    """Nodes that read the data: not Constant nodes (IR 3 writes folded weights as Constant nodes), nor
    nodes that read constants alone (the Transpose the opset-7 export puts on a MatMul weight, which the
    folded weight replaces)."""
    constants = {t.name for t in model.graph.initializer}
    return sum(1 for node in model.graph.node if node.op_type != "Constant" and not set(node.input) <= constants)


def fold_export(name, opset, tmp_path):
    """(exported model, folded model, report, error of the export against torch, error of the fold)."""
    case = CASES[name]
    module = randomized(case.build())
    x = example_input(case.input_shape)
    path = tmp_path / ("%s_opset%d.onnx" % (name, opset))
    exported = export(module, x, path, opset)
    folded, report = fold_model(path, verify=True)
    export_error = error_against_torch(exported, module, x)
    fold_error = error_against_torch(folded, module, x)
    print("\n%s opset %d: BatchNormalization %d -> %d, folded %s, rewritten %d, left %d, max relative error "
          "against torch %.2g (the export alone %.2g)"
          % (name, opset, count_ops(exported, "BatchNormalization"), count_ops(folded, "BatchNormalization"),
             report.counts()["folded"], report.counts()["rewritten"], report.counts()["left"], fold_error,
             export_error))
    return exported, folded, report, export_error, fold_error


# ---------------------------------------------------------------------- the tests


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_export_folds_and_matches_torch(name, opset, tmp_path):
    case = CASES[name]
    exported, folded, report, export_error, fold_error = fold_export(name, opset, tmp_path)
    counts = report.counts()
    assert count_ops(exported, "BatchNormalization") == case.batch_norms == counts["normalizations"]
    assert count_ops(folded, "BatchNormalization") == case.left == counts["left"]
    assert counts["folded"] == case.folded
    assert counts["rewritten"] == case.rewritten
    assert report.verification.passed
    assert export_error < FLOAT32_TOLERANCE  # the exporter itself is faithful, so a failure below is the fold's
    assert fold_error < FLOAT32_TOLERANCE
    assert computing_nodes(folded) == computing_nodes(exported) - (case.batch_norms - case.left) + case.nodes_added
    onnx.checker.check_model(folded, full_check=True)
    # Below IR 4 (opset 7 exports) initializers are declared as inputs too: a folded one goes with its
    # declaration; the model's own inputs stay, in order.
    kept = {t.name for t in folded.graph.initializer}
    declared = {t.name for t in exported.graph.initializer} if exported.ir_version < 4 else set()
    assert [i.name for i in folded.graph.input] == [i.name for i in exported.graph.input
                                                     if i.name not in declared or i.name in kept]
    assert folded.ir_version == exported.ir_version
    assert [o.name for o in folded.graph.output] == [o.name for o in exported.graph.output]
    assert list(folded.opset_import) == list(exported.opset_import)


@pytest.mark.parametrize("opset", OPSETS)
def test_pre_activation_block_reports_why_each_batch_norm_went_where_it_did(opset, tmp_path):
    _, folded, report, _, fold_error = fold_export("pre_activation", opset, tmp_path)

    on_input = outcome(report, "/bn_input/BatchNormalization")
    assert on_input.action == "left" and on_input.into is None and "kept as BatchNormalization" in on_input.reason
    assert "'input.1' is a graph input" in on_input.reason
    assert "pads its input (pads=[1, 1, 1, 1])" in on_input.reason

    before_relu = outcome(report, "/bn1/BatchNormalization")
    assert before_relu.action == "left"
    assert "has 2 readers" in before_relu.reason and "Relu" in before_relu.reason

    assert outcome(report, "/bn2/BatchNormalization").action == "folded"
    assert outcome(report, "/bn2/BatchNormalization").into == "Conv"
    into_conv = outcome(report, "/bn_out/BatchNormalization")
    assert into_conv.action == "folded" and into_conv.folded_into == "Conv (forward)"
    assert "/conv_out/Conv" in into_conv.reason

    # the two that no layer can take stay BatchNormalization (one pass in onnxruntime); the residual Add stays
    assert count_ops(folded, "BatchNormalization") == 2 and count_ops(folded, "Add") == 1
    assert count_ops(folded, "Mul") == 0
    assert fold_error < FLOAT32_TOLERANCE


def test_dynamic_batch_export_is_verified_at_batch_one_and_folds_for_any_batch(tmp_path):
    module = randomized(ResNet())
    exported = export(module, example_input((2, 3, 16, 16)), tmp_path / "resnet.onnx", 13,
                      input_names=["image"], dynamic_axes={"image": {0: "batch"}})
    folded, report = fold_model(tmp_path / "resnet.onnx", verify=True)
    assert count_ops(exported, "BatchNormalization") == 6 and count_ops(folded, "BatchNormalization") == 0
    assert report.verification.passed
    assert report.verification.dynamic_dims == {"image": [0]}
    assert list(report.verification.input_shapes["image"]) == [1, 3, 16, 16]
    for batch in (1, 5):
        assert error_against_torch(folded, module, example_input((batch, 3, 16, 16), seed=batch)) < FLOAT32_TOLERANCE


def test_export_without_constant_folding_folds_the_same(tmp_path):
    module = randomized(MobileNetV2())
    x = example_input((2, 3, 16, 16))
    exported = export(module, x, tmp_path / "mobilenet.onnx", 13, do_constant_folding=False)
    folded, report = fold_model(tmp_path / "mobilenet.onnx", verify=True)
    assert count_ops(exported, "BatchNormalization") == 11 and count_ops(folded, "BatchNormalization") == 0
    assert report.counts()["folded"] == {"Conv": 11}
    assert error_against_torch(folded, module, x) < FLOAT32_TOLERANCE


def test_parameters_kept_as_graph_inputs_are_left_because_a_caller_may_override_them(tmp_path):
    """keep_initializers_as_inputs=True at IR 4 and later: every weight is a graph input with a default
    value, which a caller may replace at run time; folding it would ignore the replacement."""
    module = randomized(ResNet())
    x = example_input((2, 3, 16, 16))
    exported = export(module, x, tmp_path / "resnet.onnx", 13, keep_initializers_as_inputs=True)
    assert exported.ir_version >= 4
    folded, report = fold_model(tmp_path / "resnet.onnx", verify=True)
    assert count_ops(folded, "BatchNormalization") == 6 == report.counts()["left"]
    stem = outcome(report, "/stem/stem.1/BatchNormalization")
    assert stem.action == "left" and "'stem.1.weight'" in stem.reason
    assert "graph input with a default value" in stem.reason and "keep_initializers_as_inputs" in stem.reason
    assert error_against_torch(folded, module, x) < FLOAT32_TOLERANCE


@pytest.mark.parametrize("opset, reason", [(9, "running-statistics outputs"), (13, "running-statistics outputs"),
                                           (17, "training_mode=1")])
def test_batch_norm_without_running_statistics_is_left(opset, reason, tmp_path):
    module = randomized(BatchStatistics())
    x = example_input((2, 3, 8, 8))
    exported = export(module, x, tmp_path / "batch_statistics.onnx", opset)
    folded, report = fold_model(tmp_path / "batch_statistics.onnx", verify=True)
    assert count_ops(exported, "BatchNormalization") == 1 == count_ops(folded, "BatchNormalization")
    (left,) = report.normalizations()
    assert left.action == "left" and reason in left.reason
    assert error_against_torch(folded, module, x) < FLOAT32_TOLERANCE


@pytest.mark.parametrize("opset", (13, 17))
def test_scripted_control_flow_folds_in_both_branches(opset, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.script(randomized(Branches()))
    x = example_input((2, 3, 8, 8))
    exported = export(module, x, tmp_path / "branches.onnx", opset)
    folded, report = fold_model(tmp_path / "branches.onnx", verify=True)
    assert [n.op_type for n in exported.graph.node].count("If") == 1
    assert count_ops(exported, "BatchNormalization") == 2 and count_ops(folded, "BatchNormalization") == 0
    assert sorted(o.graph.rsplit(".", 1)[1] for o in report.normalizations()) == ["else_branch", "then_branch"]
    assert all(o.action == "folded" and o.into == "Conv" for o in report.normalizations())
    for taken in (x.abs(), -x.abs()):  # x.sum() > 0 picks the then branch, < 0 the else branch
        assert error_against_torch(folded, module, taken) < FLOAT32_TOLERANCE


def batch_norms_in_functions(model):
    return sum(1 for function in model.functions for node in function.node if node.op_type == "BatchNormalization")


def test_modules_exported_as_functions_fold(tmp_path):
    """torch writes each BasicBlock as a model-local function; the pass inlines them to fold their BNs."""
    module = randomized(ResNet())
    x = example_input((2, 3, 16, 16))
    exported = export(module, x, tmp_path / "resnet.onnx", 17, export_modules_as_functions={BasicBlock})
    assert count_ops(exported, "BatchNormalization") == 1 and batch_norms_in_functions(exported) == 5
    folded, report = fold_model(tmp_path / "resnet.onnx", verify=True)
    assert error_against_torch(folded, module, x) < FLOAT32_TOLERANCE
    assert count_ops(folded, "BatchNormalization") + batch_norms_in_functions(folded) == 0
    assert report.counts()["normalizations"] == 6
    assert any("inlined the model's local functions" in note and "BasicBlock" in note for note in report.notes)
