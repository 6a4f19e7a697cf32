"""Small versions of real image architectures, and a token MLP, written in torch for the fold corpus.

Each network keeps the structure its family is known for (residual bottlenecks, inverted residuals with
squeeze-excitation, grouped convolutions, dense concatenation, channel shuffle, inception branches,
ghost modules, BatchNorm1d over tokens), at widths and depths small enough to export and run in well
under a second. `randomized` gives every weight and every BatchNorm's statistics and affine parameters
seeded random values, negative scales included, so that a fold that mixes up channels shows.

`python -m tests.fold.architectures` exports each network with both exporters, folds it and prints the
corpus table in Markdown.
"""
import torch
from torch import nn
from torch.nn import functional as F


def conv_bn(channels_in, channels_out, kernel=3, stride=1, groups=1, activation=nn.ReLU, eps=1e-5):
    layers = [nn.Conv2d(channels_in, channels_out, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(channels_out, eps=eps)]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed, activation=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.activation = activation()
        self.gate = gate()

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.activation(self.reduce(scale))))


# ---------------------------------------------------------------------- ResNet (bottleneck)


class Bottleneck(nn.Module):
    def __init__(self, channels_in, width, stride):
        super().__init__()
        channels_out = width * 4
        self.body = nn.Sequential(conv_bn(channels_in, width, 1), conv_bn(width, width, 3, stride),
                                  conv_bn(width, channels_out, 1, activation=None))
        self.shortcut = None
        if stride != 1 or channels_in != channels_out:
            self.shortcut = conv_bn(channels_in, channels_out, 1, stride, activation=None)

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.body(x) + shortcut)


class ResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 7, 2), nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(Bottleneck(8, 4, 1), Bottleneck(16, 4, 1), Bottleneck(16, 8, 2))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


# ---------------------------------------------------------------------- MobileNetV3


class InvertedResidualV3(nn.Module):
    def __init__(self, channels_in, hidden, channels_out, kernel, stride, squeeze, activation):
        super().__init__()
        self.residual = stride == 1 and channels_in == channels_out
        layers = []
        if hidden != channels_in:
            layers.append(conv_bn(channels_in, hidden, 1, activation=activation, eps=1e-3))
        layers.append(conv_bn(hidden, hidden, kernel, stride, groups=hidden, activation=activation, eps=1e-3))
        if squeeze:
            layers.append(SqueezeExcite(hidden, max(hidden // 4, 8), gate=nn.Hardsigmoid))
        layers.append(conv_bn(hidden, channels_out, 1, activation=None, eps=1e-3))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV3(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2, activation=nn.Hardswish, eps=1e-3),
            InvertedResidualV3(8, 8, 8, 3, 2, True, nn.ReLU),
            InvertedResidualV3(8, 24, 12, 3, 2, False, nn.ReLU),
            InvertedResidualV3(12, 36, 12, 3, 1, False, nn.ReLU),
            InvertedResidualV3(12, 48, 16, 5, 2, True, nn.Hardswish),
            InvertedResidualV3(16, 64, 16, 5, 1, True, nn.Hardswish),
            conv_bn(16, 64, 1, activation=nn.Hardswish, eps=1e-3))
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ---------------------------------------------------------------------- EfficientNet


class MBConv(nn.Module):
    def __init__(self, channels_in, channels_out, expand, kernel, stride):
        super().__init__()
        hidden = channels_in * expand
        self.residual = stride == 1 and channels_in == channels_out
        layers = []
        if expand != 1:
            layers.append(conv_bn(channels_in, hidden, 1, activation=nn.SiLU, eps=1e-3))
        layers += [conv_bn(hidden, hidden, kernel, stride, groups=hidden, activation=nn.SiLU, eps=1e-3),
                   SqueezeExcite(hidden, max(channels_in // 4, 2), activation=nn.SiLU),
                   conv_bn(hidden, channels_out, 1, activation=None, eps=1e-3)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y  # stochastic depth is the identity in eval mode


class EfficientNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2, activation=nn.SiLU, eps=1e-3),
            MBConv(8, 8, 1, 3, 1), MBConv(8, 12, 4, 3, 2), MBConv(12, 12, 4, 3, 1), MBConv(12, 16, 4, 5, 2),
            conv_bn(16, 48, 1, activation=nn.SiLU, eps=1e-3))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(48, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ---------------------------------------------------------------------- RegNet (Y: groups and SE)


class RegNetBlock(nn.Module):
    def __init__(self, channels_in, channels_out, stride, group_width):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(channels_in, channels_out, 1),
            conv_bn(channels_out, channels_out, 3, stride, groups=channels_out // group_width),
            SqueezeExcite(channels_out, max(channels_in // 4, 2)),
            conv_bn(channels_out, channels_out, 1, activation=None))
        self.shortcut = None
        if stride != 1 or channels_in != channels_out:
            self.shortcut = conv_bn(channels_in, channels_out, 1, stride, activation=None)

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.body(x) + shortcut)


class RegNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.stages = nn.Sequential(RegNetBlock(8, 16, 2, 8), RegNetBlock(16, 16, 1, 8), RegNetBlock(16, 32, 2, 8))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


# ---------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    def __init__(self, channels_in, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels_in)
        self.conv1 = nn.Conv2d(channels_in, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))


class DenseBlock(nn.Module):
    def __init__(self, layers, channels_in, growth):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(channels_in + i * growth, growth) for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.block1 = DenseBlock(2, 8, 4)
        self.transition = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False),
                                        nn.AvgPool2d(2, 2))
        self.block2 = DenseBlock(2, 8, 4)
        self.norm = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = torch.relu(self.norm(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x, groups):
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, channels_in, channels_out, stride):
        super().__init__()
        self.stride = stride
        branch = channels_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(channels_in, channels_in, 3, stride, groups=channels_in,
                                                 activation=None),
                                         conv_bn(channels_in, branch, 1))
        source = channels_in if stride > 1 else branch
        self.branch2 = nn.Sequential(conv_bn(source, branch, 1),
                                     conv_bn(branch, branch, 3, stride, groups=branch, activation=None),
                                     conv_bn(branch, branch, 1))

    def forward(self, x):
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat((left, self.branch2(right)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1), ShuffleUnit(16, 32, 2))
        self.head = conv_bn(32, 48, 1)
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        return self.fc(self.head(self.stages(self.stem(x))).mean([2, 3]))


# ---------------------------------------------------------------------- MnasNet


class MnasBlock(nn.Module):
    def __init__(self, channels_in, channels_out, kernel, stride, expand):
        super().__init__()
        hidden = channels_in * expand
        self.residual = stride == 1 and channels_in == channels_out
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden, momentum=0.0003), nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden, momentum=0.0003), nn.ReLU(),
            nn.Conv2d(hidden, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out, momentum=0.0003))

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MnasNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.layers = nn.Sequential(
            conv_bn(3, 8, 3, 2),
            nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8),
            MnasBlock(8, 12, 3, 2, 3), MnasBlock(12, 12, 3, 1, 3), MnasBlock(12, 16, 5, 2, 3),
            conv_bn(16, 64, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.layers(x).mean([2, 3]))


# ---------------------------------------------------------------------- GoogLeNet (Inception v1)


def basic_conv(channels_in, channels_out, kernel, stride=1):
    return conv_bn(channels_in, channels_out, kernel, stride, eps=0.001)


class Inception(nn.Module):
    def __init__(self, channels_in, ch1, ch3_reduce, ch3, ch5_reduce, ch5, pool):
        super().__init__()
        self.branch1 = basic_conv(channels_in, ch1, 1)
        self.branch2 = nn.Sequential(basic_conv(channels_in, ch3_reduce, 1), basic_conv(ch3_reduce, ch3, 3))
        self.branch3 = nn.Sequential(basic_conv(channels_in, ch5_reduce, 1), basic_conv(ch5_reduce, ch5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), basic_conv(channels_in, pool, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(basic_conv(3, 8, 7, 2), nn.MaxPool2d(3, 2, ceil_mode=True), basic_conv(8, 8, 1),
                                  basic_conv(8, 16, 3), nn.MaxPool2d(3, 2, ceil_mode=True))
        self.inception3a = Inception(16, 8, 8, 12, 4, 4, 4)
        self.inception3b = Inception(28, 12, 12, 16, 4, 8, 8)
        self.fc = nn.Linear(44, classes)

    def forward(self, x):
        x = self.inception3b(self.inception3a(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------- GhostNet


class GhostModule(nn.Module):
    def __init__(self, channels_in, channels_out, relu=True):
        super().__init__()
        self.channels_out = channels_out
        primary = (channels_out + 1) // 2
        activation = nn.ReLU if relu else None
        self.primary = conv_bn(channels_in, primary, 1, activation=activation)
        self.cheap = conv_bn(primary, primary, 3, groups=primary, activation=activation)

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)[:, :self.channels_out]


class GhostBottleneck(nn.Module):
    def __init__(self, channels_in, hidden, channels_out, stride, squeeze):
        super().__init__()
        self.ghost1 = GhostModule(channels_in, hidden)
        self.depthwise = (conv_bn(hidden, hidden, 3, stride, groups=hidden, activation=None) if stride > 1
                          else nn.Identity())
        self.squeeze = SqueezeExcite(hidden, max(hidden // 4, 4), gate=nn.Hardsigmoid) if squeeze else nn.Identity()
        self.ghost2 = GhostModule(hidden, channels_out, relu=False)
        if stride == 1 and channels_in == channels_out:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(conv_bn(channels_in, channels_in, 3, stride, groups=channels_in,
                                                  activation=None),
                                          conv_bn(channels_in, channels_out, 1, activation=None))

    def forward(self, x):
        y = self.ghost2(self.squeeze(self.depthwise(self.ghost1(x))))
        return y + self.shortcut(x)


class GhostNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.blocks = nn.Sequential(GhostBottleneck(8, 8, 8, 1, False), GhostBottleneck(8, 24, 12, 2, False),
                                    GhostBottleneck(12, 36, 16, 2, True), conv_bn(16, 48, 1))
        self.head = nn.Linear(48, 32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)
        return self.fc(torch.relu(self.head(x)))


# ---------------------------------------------------------------------- token MLP with BatchNorm1d


class TokenMLP(nn.Module):
    """Patch embedding by a strided Conv, then tokens through Linear + BatchNorm1d (over the features,
    between two transposes, as torch's BatchNorm1d wants them), and a classifier head that flattens a
    BN'd 1x1 feature map into a Linear."""

    def __init__(self, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.bn_patch = nn.BatchNorm2d(16)
        self.mix1 = nn.Linear(16, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.mix2 = nn.Linear(32, 16, bias=False)
        self.bn2 = nn.BatchNorm1d(16)
        self.pool_conv = nn.Conv2d(16, 24, 1)
        self.bn_head = nn.BatchNorm1d(24)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.bn_patch(self.patch(x))
        tokens = x.flatten(2).transpose(1, 2)                      # (B, T, 16)
        y = self.bn1(self.mix1(tokens).transpose(1, 2)).transpose(1, 2)
        y = torch.relu(y)
        y = self.bn2(self.mix2(y).transpose(1, 2)).transpose(1, 2)  # (B, T, 16)
        pooled = (tokens + y).mean(1)[:, :, None, None]             # (B, 16, 1, 1)
        head = self.bn_head(torch.flatten(self.pool_conv(pooled), 1))
        return self.fc(head)


ARCHITECTURES = {
    "resnet": ResNet,
    "mobilenet_v3": MobileNetV3,
    "efficientnet": EfficientNet,
    "regnet": RegNet,
    "densenet": DenseNet,
    "shufflenet_v2": ShuffleNetV2,
    "mnasnet": MnasNet,
    "googlenet": GoogLeNet,
    "ghostnet": GhostNet,
    "token_mlp": TokenMLP,
}

# Two input sizes per network (batch, height and width all differ), multiples of 32 as the families expect.
INPUT_SHAPES = ((2, 3, 32, 32), (3, 3, 64, 96))


def randomized(module, seed=0):
    """The module in eval mode with seeded random weights and BatchNorm statistics far from the identity:
    weight uniform in [-1.5, 1.5) (negative scales included), bias and running_mean N(0, 0.5^2),
    running_var in [0.2, 2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            fan_in = parameter[0].numel() if parameter.dim() > 1 else 10
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in ** 0.5)
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                channels = bn.num_features
                bn.weight.copy_(torch.rand(channels, generator=generator) * 3.0 - 1.5)
                bn.bias.copy_(torch.randn(channels, generator=generator) * 0.5)
                bn.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
                bn.running_var.copy_(torch.rand(channels, generator=generator) * 1.8 + 0.2)
    return module.eval()


def build(name, seed=0):
    return randomized(ARCHITECTURES[name](), seed)


# ---------------------------------------------------------------------- export, fold, compare

EXPORTERS = ("torchscript", "dynamo")
OPSET = 17  # the TorchScript exporter's; the dynamo exporter writes its own (18 or later)


def export(name, exporter, folder, seed=0):
    """Export network `name` as users do; returns (path, module, input shapes to compare at).

    torchscript: dynamo=False with training=PRESERVE (in eval mode: without it the exporter folds
    Conv+BatchNorm itself) and dynamic batch, height and width through dynamic_axes. dynamo: dynamo=True
    with optimize=False, a dynamic batch (dynamic height and width multiply its export time on a small
    machine), so the two comparisons differ in batch only.
    """
    import warnings

    module = build(name, seed)
    example = torch.randn(INPUT_SHAPES[0], generator=torch.Generator().manual_seed(seed))
    path = "%s/%s_%s.onnx" % (folder, name, exporter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(module, (example,), path, dynamo=False, opset_version=OPSET, input_names=["input"],
                              training=torch.onnx.TrainingMode.PRESERVE,
                              dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}})
            return path, module, INPUT_SHAPES
        program = torch.onnx.export(module, (example,), dynamo=True, optimize=False, input_names=["input"],
                                    verbose=False, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        program.save(path)
    return path, module, (INPUT_SHAPES[0], (INPUT_SHAPES[1][0],) + INPUT_SHAPES[0][1:])


def run_onnxruntime(model, x, level=None):
    """The model's only output in onnxruntime on the CPU (graph optimizations off unless `level`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level or ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: x})[0]


def peer_optimized(path, folder):
    """The model as onnxruntime's basic-level optimizer writes it (its Conv+BatchNorm fusion among others)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = "%s/peer_%s" % (folder, path.rsplit("/", 1)[-1])
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def error_against_torch(model, module, shape, seed=1):
    """max|onnxruntime - torch| / max|torch| on a seeded random input of `shape`."""
    import numpy as np

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = module(x).numpy().astype(np.float64)
    actual = run_onnxruntime(model, x.numpy())
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def batch_norm_names(model):
    return {node.name for node in model.graph.node if node.op_type == "BatchNormalization"}


def corpus_row(name, exporter, folder, **fold_options):
    """Export, fold and compare one network: a dict of what the corpus table shows."""
    import onnx

    from foldnorm.fold import fold_model

    path, module, shapes = export(name, exporter, folder)
    original = onnx.load(path)
    folded, report = fold_model(path, **fold_options)
    counts = report.counts()
    peer = peer_optimized(path, folder)
    return {
        "architecture": name, "exporter": exporter, "original": original, "folded": folded, "report": report,
        "batch_norms": counts["normalizations"], "folded_count": sum(counts["folded"].values()),
        "rewritten": counts["rewritten"], "left": counts["left"],
        "peer_removed": batch_norm_names(original) - batch_norm_names(peer),
        "peer_left": len(batch_norm_names(peer)),
        "shapes": shapes, "errors": [error_against_torch(folded, module, shape) for shape in shapes],
        "export_errors": [error_against_torch(original, module, shape) for shape in shapes],
        "fold_seconds": report.fold_seconds,
    }


def _dims(shape):
    return "x".join(str(d) for d in shape)


def markdown_table(rows):
    lines = ["| architecture | exporter | BN before -> folded / rewritten / left | peer (onnxruntime basic) leaves "
             "| shapes verification chose | verification: max abs error (noise) | max rel. error vs torch at "
             "two sizes (original export's) | fold time |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        verification = row["report"].verification
        chosen = ", ".join(_dims(shapes["input"]) for shapes in verification.shape_sets) if verification else "-"
        worst = max(verification.outputs, key=lambda o: o.max_abs_error) if verification else None
        checked = "%.1e (%s)" % (worst.max_abs_error, "-" if worst.noise is None else "%.1e" % worst.noise) \
            if worst else "-"
        lines.append("| %s | %s | %d -> %d / %d / %d | %d BN | %s | %s | %.1e (%.1e) at %s | %.0f ms |" % (
            row["architecture"], row["exporter"], row["batch_norms"], row["folded_count"], row["rewritten"],
            row["left"], row["peer_left"], chosen, checked, max(row["errors"]), max(row["export_errors"]),
            ", ".join(_dims(shape) for shape in row["shapes"]), row["fold_seconds"] * 1e3))
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        table = [corpus_row(name, exporter, folder) for name in ARCHITECTURES for exporter in EXPORTERS]
    print(markdown_table(table))
