"""Shared test helpers: single-node ONNX models run in onnxruntime, and the ONNX backend node test cases.

onnx's helper.make_model writes the newest IR version, which onnxruntime may refuse, so every model here
sets its IR version explicitly.
"""
import functools
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

IR_VERSION = 8


def single_node_model(op_type, inputs, outputs, opset, attrs=None, domain="", initializers=None):
    """A model with one node.

    inputs: list of (name, array) for graph inputs, or (name, None) for an omitted optional input ("").
    outputs: list of (name, onnx elem type) for the graph outputs.
    initializers: optional list of (name, array) that become initializers instead of graph inputs.
    """
    graph_inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for name, a in inputs
        if a is not None
    ]
    node_inputs = [name if a is not None else "" for name, a in inputs]
    inits = []
    for name, a in initializers or []:
        inits.append(numpy_helper.from_array(a, name))
        node_inputs.append(name)
    node = helper.make_node(op_type, node_inputs, [name for name, _ in outputs], domain=domain, **(attrs or {}))
    graph = helper.make_graph(
        [node],
        op_type.lower(),
        graph_inputs,
        [helper.make_tensor_value_info(name, elem, None) for name, elem in outputs],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, opset)])
    model.ir_version = IR_VERSION
    return model


def run_ort(model, feeds, threads=1):
    """Every output of a model in onnxruntime (CPU, graph optimizations disabled, so that onnxruntime
    folds nothing itself), as {output name: array} in the graph's output order."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@functools.lru_cache(maxsize=None)
def _all_node_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return tuple(collect_testcases(None))


def backend_node_cases(prefix):
    """The ONNX backend node test cases whose name starts with `prefix` (expanded variants excluded).

    Each is (name, node, inputs, expected_outputs) with the arrays of every data set.
    """
    cases = []
    for case in _all_node_cases():
        if not case.name.startswith(prefix) or "expanded" in case.name:
            continue
        node = case.model.graph.node[0]
        for i, (inputs, outputs) in enumerate(case.data_sets):
            cases.append(("%s_%d" % (case.name, i), node, list(inputs), list(outputs)))
    return cases


def node_attributes(node):
    """A node's attributes as a dict of Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def onnx_opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


__all__ = ["single_node_model", "run_ort", "backend_node_cases", "node_attributes", "onnx_opset", "onnx"]
