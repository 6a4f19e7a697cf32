"""One ONNX model builder for the demo, the tests and the benchmarks.

Models are built node by node with onnx.helper from seeded random weights, with an explicit IR version
(onnx writes the newest by default, which onnxruntime may refuse). The network helpers (`conv`, `gemm`,
`frozen_batch_norm`) scale their weights so that activations stay of order one through deep stacks.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17
NUMPY_TO_ELEM = {
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
}


class ModelBuilder:
    """A graph under construction: initializers, nodes, inputs, outputs and value_info.

    Parameters
    ----------
    seed : int
        Seed of the random weights.
    dtype : numpy dtype
        Element type of weights, inputs and outputs unless a call says otherwise.
    """

    def __init__(self, seed=0, dtype=np.float32):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.elem = NUMPY_TO_ELEM[self.dtype]
        self.nodes = []
        self.initializers = []
        self.inputs = []
        self.outputs = []
        self.value_info = []
        self._count = 0

    # ------------------------------------------------------------------ names, constants, nodes

    def fresh(self, prefix):
        """A new name `prefix_N`."""
        self._count += 1
        return "%s_%d" % (prefix, self._count)

    def constant(self, name, array, dtype=None):
        """Add an initializer holding `array` (named `name`, or a fresh name when None); returns its name."""
        name = name or self.fresh("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype or self.dtype), name))
        return name

    def weight(self, name, shape, dtype=None, positive=False):
        """A standard-normal initializer (|x| + 0.5 when positive); returns its name."""
        array = self.rng.standard_normal(shape)
        if positive:
            array = np.abs(array) + 0.5
        return self.constant(name, array, dtype)

    def node(self, op_type, inputs, outputs=None, name=None, **attributes):
        """Add a node; outputs default to one fresh name, which also names the node when `name` is None.
        Returns the output name (or the list of them)."""
        if outputs is None:
            outputs = [self.fresh(name or op_type.lower())]
            name = name or outputs[0]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attributes))
        return outputs[0] if len(outputs) == 1 else outputs

    def input(self, name, shape, elem=None):
        self.inputs.append(helper.make_tensor_value_info(name, elem or self.elem, shape))
        return name

    def output(self, name, shape=None, elem=None):
        self.outputs.append(helper.make_tensor_value_info(name, elem or self.elem, shape))
        return name

    def model(self, opset=OPSET, ir_version=IR_VERSION, name="model", producer="foldnorm", check=False):
        """The ModelProto; check=True runs onnx.checker's full check on it."""
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers,
                                  value_info=self.value_info)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
        model.ir_version = ir_version
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model

    # ------------------------------------------------------------------ batch normalization

    def batch_norm_params(self, prefix, channels, dtype=None, mean_dtype=None):
        """Names of scale, bias, mean, var initializers with spread-out values (not an identity map)."""
        dtype = dtype or self.dtype
        mean_dtype = mean_dtype or dtype
        return [
            self.weight(prefix + "_scale", (channels,), dtype),
            self.weight(prefix + "_bias", (channels,), dtype),
            self.weight(prefix + "_mean", (channels,), mean_dtype),
            self.weight(prefix + "_var", (channels,), mean_dtype, positive=True),
        ]

    def batch_norm(self, x, y, channels, name=None, **attributes):
        """BatchNormalization of x into y with spread-out parameters (negative scales included)."""
        prefix = name or y
        return self.node("BatchNormalization", [x] + self.batch_norm_params(prefix, channels), [y],
                         name=name or "bn_" + y, **attributes)

    def frozen_batch_norm(self, x, channels, name=None, outputs=None):
        """A BatchNormalization with trained-looking statistics (scale and var in 0.5..1.5, small shifts)."""
        prefix = name or self.fresh("bn")
        params = [
            self.constant(prefix + ".scale", self.rng.uniform(0.5, 1.5, channels)),
            self.constant(prefix + ".bias", self.rng.standard_normal(channels) * 0.1),
            self.constant(prefix + ".mean", self.rng.standard_normal(channels) * 0.1),
            self.constant(prefix + ".var", self.rng.uniform(0.5, 1.5, channels)),
        ]
        return self.node("BatchNormalization", [x] + params, outputs, name=prefix, epsilon=1e-5)

    # ------------------------------------------------------------------ network layers

    def conv(self, x, c_in, c_out, kernel, *, stride=1, pad=None, groups=1, bias=False, gain=1.0, name=None):
        """A 2-D Conv with He-scaled weights times `gain`; pad defaults to kernel // 2."""
        prefix = name or self.fresh("conv")
        fan_in = c_in // groups * kernel * kernel
        weight = self.rng.normal(0, gain * np.sqrt(2.0 / fan_in), (c_out, c_in // groups, kernel, kernel))
        inputs = [x, self.constant(prefix + ".weight", weight)]
        if bias:
            inputs.append(self.constant(prefix + ".bias", self.rng.standard_normal(c_out) * 0.1))
        pad = kernel // 2 if pad is None else pad
        return self.node("Conv", inputs, name=prefix, kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=[pad] * 4, group=groups)

    def gemm(self, x, n_in, n_out, *, name=None, outputs=None):
        """A Gemm (transB=1) with weights scaled by 1/sqrt(n_in) and a small bias."""
        prefix = name or self.fresh("gemm")
        weight = self.constant(prefix + ".weight", self.rng.normal(0, np.sqrt(1.0 / n_in), (n_out, n_in)))
        bias = self.constant(prefix + ".bias", self.rng.standard_normal(n_out) * 0.1)
        return self.node("Gemm", [x, weight, bias], outputs, name=prefix, transB=1)

    def relu(self, x):
        return self.node("Relu", [x])

    def classifier(self, x, channels, classes, name="fc"):
        """GlobalAveragePool, Flatten and a Gemm to `classes` logits."""
        pooled = self.node("Flatten", [self.node("GlobalAveragePool", [x])], axis=1)
        return self.gemm(pooled, channels, classes, name=name)

