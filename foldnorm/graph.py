"""The graph layer of the fold pass: an editable index of one ONNX graph, and its constants.

`GraphIndex` knows, for one graph (the main graph or an If/Loop/Scan body), the node that produces each
value and the nodes that read it -- a node whose subgraph captures an outer value counts as one of its
readers --, which values are graph inputs and outputs, and which are constant: initializers, Constant
nodes, and small constant sub-graphs (ConstantOfShape, Cast, Reshape, ... of constants), evaluated once
and cached. The fold rules edit the graph only through it: rewiring an input, renaming an output,
inserting and removing nodes, adding a constant under a fresh name. Edits are recorded and written back
once per graph by `commit`, so a pass over the graph costs time linear in its size.

bfloat16 tensors are handed out as float32 arrays (exact) with their element type kept beside them, and
written back rounded to bfloat16, so the numeric code never sees an ml_dtypes array.
"""
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE)

# Ops whose output is constant when their inputs are, evaluated by hand (shape/type plumbing the light_*
# models and exporters build weights with) or by onnx's reference evaluator (small arithmetic).
_BY_HAND = ("Identity", "Cast", "ConstantOfShape", "Reshape", "Unsqueeze", "Squeeze", "Concat",
            "Transpose", "Flatten")
_BY_REFERENCE = ("Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Expand", "Tile", "Slice",
                 "Gather", "Split", "Range")


@dataclass(frozen=True)
class Constant:
    """A constant value: `array` (float32 for bfloat16 data) and its ONNX element type."""

    array: np.ndarray
    elem_type: int


def is_default_domain(node):
    return node.domain in DEFAULT_DOMAINS


def attribute_graphs(node):
    """[(label, GraphProto)] for the subgraphs held by a node's attributes (If, Loop, Scan, ...)."""
    graphs = []
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            graphs.append((attribute.name, attribute.g))
        elif attribute.type == AttributeProto.GRAPHS:
            graphs.extend(("%s[%d]" % (attribute.name, i), g) for i, g in enumerate(attribute.graphs))
    return graphs


def node_attributes(node):
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def set_float_attribute(node, name, value):
    """Set (or add) a float attribute of a node in place."""
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.f = float(value)
            return
    node.attribute.append(helper.make_attribute(name, float(value)))


def tensor_to_array(tensor):
    """A tensor's data as a NumPy array: float32 for bfloat16 (exact), the natural dtype otherwise."""
    array = numpy_helper.to_array(tensor)
    if tensor.data_type == TensorProto.BFLOAT16:
        array = array.astype(np.float32)
    return array


def array_to_tensor(array, name, elem_type):
    """A TensorProto of element type `elem_type` holding `array` (rounded to bfloat16 when asked)."""
    if elem_type == TensorProto.BFLOAT16:
        import ml_dtypes

        array = np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16)
    else:
        array = np.asarray(array, dtype=helper.tensor_dtype_to_np_dtype(elem_type))
    return numpy_helper.from_array(array, name)


def numpy_dtype(elem_type):
    """The NumPy dtype the fold arithmetic hands back for `elem_type` (float32 stands in for bfloat16)."""
    if elem_type == TensorProto.BFLOAT16:
        return np.dtype(np.float32)
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def tensor_nbytes(tensor):
    """Bytes of a tensor's data, from its dims and type (no decoding, external data included)."""
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


def graph_statistics(graph):
    """(nodes, parameter bytes) of a graph and all its subgraphs; parameters are initializers and the
    tensors of Constant nodes."""
    nodes = len(graph.node)
    size = sum(tensor_nbytes(t) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            size += sum(_constant_attribute_nbytes(attribute) for attribute in node.attribute)
        for _, subgraph in attribute_graphs(node):
            sub_nodes, sub_size = graph_statistics(subgraph)
            nodes += sub_nodes
            size += sub_size
    return nodes, size


def _constant_attribute_nbytes(attribute):
    if attribute.type == AttributeProto.TENSOR:
        return tensor_nbytes(attribute.t)
    if attribute.type == AttributeProto.FLOATS:
        return 4 * len(attribute.floats)
    if attribute.type == AttributeProto.INTS:
        return 8 * len(attribute.ints)
    return {AttributeProto.FLOAT: 4, AttributeProto.INT: 8}.get(attribute.type, 0)


def default_opset(model):
    """The ai.onnx opset version a model imports, or None when it imports none."""
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS:
            return opset.version
    return None


def value_types(model):
    """{value name: (elem_type, shape)} for every value onnx shape inference can type, subgraphs too.

    shape is a tuple (None for an unknown dim) or None when even the rank is unknown. Inference runs on
    a copy and is best effort: a model it cannot handle (too large, unknown ops) keeps only the types it
    declares itself.
    """
    try:
        typed = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is an optional help; the declared types remain
        typed = model
    types = {}

    def visit(graph):
        for tensor in graph.initializer:
            types[tensor.name] = (tensor.data_type, tuple(tensor.dims))
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            if not value.type.HasField("tensor_type"):
                continue
            tensor_type = value.type.tensor_type
            shape = None
            if tensor_type.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
            types.setdefault(value.name, (tensor_type.elem_type, shape))
        for node in graph.node:
            for _, subgraph in attribute_graphs(node):
                visit(subgraph)

    visit(typed.graph)
    return types


class NameScope:
    """Fresh value and node names, unique across a model and all its subgraphs."""

    def __init__(self, model):
        self._taken = set()

        def visit(graph):
            self._taken.update(t.name for t in graph.initializer)
            self._taken.update(v.name for v in graph.input)
            self._taken.update(v.name for v in graph.output)
            for node in graph.node:
                self._taken.update(node.input)
                self._taken.update(node.output)
                self._taken.add(node.name)
                for _, subgraph in attribute_graphs(node):
                    visit(subgraph)

        visit(model.graph)
        self._counters = defaultdict(int)

    def fresh(self, hint):
        hint = hint or "value"
        name = hint
        while name in self._taken:
            self._counters[hint] += 1
            name = "%s_%d" % (hint, self._counters[hint])
        self._taken.add(name)
        return name


def free_names(graph):
    """Names a graph reads from enclosing scopes (its own nested subgraphs included)."""
    defined = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    read = set()
    for node in graph.node:
        defined.update(node.output)
        read.update(name for name in node.input if name)
        for _, subgraph in attribute_graphs(node):
            read.update(free_names(subgraph))
    return read - defined


class GraphIndex:
    """An editable index of one graph; see the module docstring.

    path: where the graph sits ("main", "main/If_0.then_branch"); parent: the enclosing graph's index
    (outer values are read through it, never edited); names: the model's NameScope; opset: the ai.onnx
    opset; inputs_are_constant: whether an initializer that is also a graph input is a constant (IR
    version < 4, where every initializer must be an input) or a default the caller may override;
    constants_as_nodes: new constants become Constant nodes instead of initializers (IR < 4 requires
    every initializer to be a graph input, and the graph inputs must stay as they are).
    """

    def __init__(self, graph, *, path, names, opset, inputs_are_constant, constants_as_nodes, parent=None):
        self.graph = graph
        self.path = path
        self.parent = parent
        self.names = names
        self.opset = opset
        self.inputs_are_constant = inputs_are_constant
        self.constants_as_nodes = constants_as_nodes

        self.nodes = list(graph.node)
        self.labels = {}
        self.producer = {}
        self.consumers = defaultdict(list)
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}
        self._removed = set()
        self._after = defaultdict(list)
        self._leading = []
        self._removed_initializers = set()
        self._constants = {}
        self.released = []
        self.vanished = set()
        for position, node in enumerate(self.nodes):
            self.labels[id(node)] = node.name or "%s#%d" % (node.op_type, position)
            self._register(node)

    # ------------------------------------------------------------------ reading

    def label(self, node):
        """The node's name, or a stable "<op_type>#<position>" for a node without one."""
        return self.labels[id(node)]

    def is_removed(self, node):
        return id(node) in self._removed

    def live_nodes(self):
        return [node for node in self._leading + self._ordered() if id(node) not in self._removed]

    def readers(self, name):
        return self.consumers.get(name, [])

    def is_graph_output(self, name):
        return name in self.graph_outputs

    def is_read(self, name):
        return bool(self.readers(name)) or name in self.graph_outputs

    def only_reader(self, name):
        """The single node that reads `name`, or None when it has several, none, or is a graph output."""
        readers = self.readers(name)
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0]

    def defines(self, name):
        return name in self.producer or name in self.initializers or name in self.graph_inputs

    def constant(self, name):
        """The value's Constant, or None when it is computed at run time (or overridable)."""
        if not name:
            return None
        if name in self._constants:
            return self._constants[name]
        if not self.defines(name):
            return self.parent.constant(name) if self.parent is not None else None
        self._constants[name] = None  # a cycle (invalid model) reads as "not constant"
        try:
            value = self._evaluate(name)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError, NotImplementedError):
            value = None
        self._constants[name] = value
        return value

    def _evaluate(self, name):
        if name in self.initializers and name not in self._removed_initializers:
            if name in self.graph_inputs and not self.inputs_are_constant:
                return None
            tensor = self.initializers[name]
            if tensor.data_location == TensorProto.EXTERNAL:
                return None
            return Constant(tensor_to_array(tensor), tensor.data_type)
        node = self.producer.get(name)
        if node is None or not is_default_domain(node):
            return None
        if node.op_type == "Constant":
            return _constant_node_value(node)
        if node.op_type not in _BY_HAND + _BY_REFERENCE:
            return None
        inputs = []
        for input_name in node.input:
            if not input_name:
                inputs.append(None)
                continue
            value = self.constant(input_name)
            if value is None:
                return None
            inputs.append(value)
        if node.op_type in _BY_HAND:
            return _evaluate_by_hand(node, inputs, self.opset)
        return _evaluate_by_reference(node, inputs, self.opset, list(node.output).index(name))

    # ------------------------------------------------------------------ editing

    def set_input(self, node, position, name):
        """Make `node` read `name` at input `position` (appending when position == len(inputs))."""
        if position == len(node.input):
            node.input.append(name)
        else:
            old = node.input[position]
            if old:
                self._forget_reader(old, node)
                self.released.append(old)
            node.input[position] = name
        if name:
            self.consumers[name].append(node)

    def set_output(self, node, position, name):
        """Rename the value `node` writes at output `position`."""
        old = node.output[position]
        if self.producer.get(old) is node:
            del self.producer[old]
            self.vanished.add(old)
        node.output[position] = name
        self.producer[name] = node
        self.vanished.discard(name)

    def insert_after(self, anchor, node):
        """Add `node` to the graph right after `anchor` (after the nodes inserted there before)."""
        self._after[id(anchor)].append(node)
        self.labels[id(node)] = node.name
        self._register(node)

    def remove(self, node):
        """Take `node` out of the graph; values it read are released for clean-up."""
        self._removed.add(id(node))
        for name in self._read_names(node):
            self._forget_reader(name, node)
            self.released.append(name)
        for name in node.output:
            if name and self.producer.get(name) is node:
                del self.producer[name]
                self.vanished.add(name)

    def add_constant(self, array, elem_type, hint):
        """A new constant holding `array` as `elem_type`, under a fresh name; returns the name.

        Always new: a weight another node reads is never modified in place.
        """
        name = self.names.fresh(hint)
        tensor = array_to_tensor(array, name, elem_type)
        if self.constants_as_nodes:
            node = helper.make_node("Constant", [], [name], name=self.names.fresh(name + "_constant"), value=tensor)
            self._leading.append(node)
            self.labels[id(node)] = node.name
            self.producer[name] = node
        else:
            self.graph.initializer.append(tensor)
            self.initializers[name] = self.graph.initializer[-1]
        self._constants[name] = Constant(tensor_to_array(tensor), elem_type)
        return name

    def new_node(self, op_type, inputs, outputs, hint, **attributes):
        return helper.make_node(op_type, inputs, outputs, name=self.names.fresh(hint), **attributes)

    # ------------------------------------------------------------------ clean-up and write-back

    def remove_initializer(self, name):
        self._removed_initializers.add(name)
        self.vanished.add(name)

    def is_protected(self, name):
        return name in self.graph_inputs or name in self.graph_outputs

    def commit(self):
        """Write the edits back into the GraphProto (once, at the end of the pass)."""
        nodes = [n for n in self._leading + self._ordered() if id(n) not in self._removed]
        if len(nodes) != len(self.graph.node) or any(a is not b for a, b in zip(nodes, self.nodes)):
            copies = []
            for node in nodes:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copies.append(copy)
            del self.graph.node[:]
            self.graph.node.extend(copies)
        if self._removed_initializers:
            kept = [t for t in self.graph.initializer if t.name not in self._removed_initializers]
            del self.graph.initializer[:]
            self.graph.initializer.extend(kept)
        stale = {name for name in self.vanished if not self.defines(name) or name in self._removed_initializers}
        if stale and any(v.name in stale for v in self.graph.value_info):
            kept = [v for v in self.graph.value_info if v.name not in stale]
            del self.graph.value_info[:]
            self.graph.value_info.extend(kept)

    def _ordered(self):
        ordered = []
        stack = list(reversed(self.nodes))
        while stack:
            node = stack.pop()
            ordered.append(node)
            stack.extend(reversed(self._after.get(id(node), ())))
        return ordered

    def _register(self, node):
        for name in node.output:
            if name:
                self.producer[name] = node
                self.vanished.discard(name)
        for name in self._read_names(node):
            self.consumers[name].append(node)

    def _read_names(self, node):
        names = [name for name in node.input if name]
        for _, subgraph in attribute_graphs(node):
            names.extend(sorted(free_names(subgraph)))
        return names

    def _forget_reader(self, name, node):
        readers = self.consumers.get(name)
        if not readers:
            return
        for i, reader in enumerate(readers):
            if reader is node:
                del readers[i]
                return


def remove_unused(indexes):
    """Remove what the edits left unused in any of the graphs: initializers, and nodes none of whose
    outputs is read any more (the constant sub-graphs that computed a folded weight). Graph inputs and
    outputs are never removed; only values the edits released are considered, so nodes the model had
    unused already stay as they were.
    """
    reads = defaultdict(int)
    for index in indexes:
        for node in index.live_nodes():
            for name in node.input:
                if name:
                    reads[name] += 1
    worklist = [(index, name) for index in indexes for name in index.released]
    while worklist:
        index, name = worklist.pop()
        owner = index
        while owner is not None and not owner.defines(name):
            owner = owner.parent
        if owner is None or reads[name] > 0 or owner.is_protected(name):
            continue
        if name in owner.initializers and name not in owner.producer:
            owner.remove_initializer(name)
            continue
        node = owner.producer.get(name)
        if node is None or owner.is_removed(node) or attribute_graphs(node):
            continue
        if any(reads[out] > 0 or owner.is_protected(out) for out in node.output if out):
            continue
        owner.remove(node)
        for input_name in node.input:
            if input_name:
                reads[input_name] -= 1
                worklist.append((owner, input_name))


# ---------------------------------------------------------------------- constant evaluation


def _constant_node_value(node):
    attributes = {a.name: a for a in node.attribute}
    if "value" in attributes:
        tensor = attributes["value"].t
        if tensor.data_location == TensorProto.EXTERNAL:
            return None
        return Constant(tensor_to_array(tensor), tensor.data_type)
    if "value_float" in attributes:
        return Constant(np.array(attributes["value_float"].f, dtype=np.float32), TensorProto.FLOAT)
    if "value_floats" in attributes:
        return Constant(np.array(list(attributes["value_floats"].floats), dtype=np.float32), TensorProto.FLOAT)
    if "value_int" in attributes:
        return Constant(np.array(attributes["value_int"].i, dtype=np.int64), TensorProto.INT64)
    if "value_ints" in attributes:
        return Constant(np.array(list(attributes["value_ints"].ints), dtype=np.int64), TensorProto.INT64)
    if "sparse_value" in attributes:
        from onnx.reference import ReferenceEvaluator

        (array,) = ReferenceEvaluator(node).run(None, {})
        return _constant_from_array(array)
    return None


def _constant_from_array(array):
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return Constant(array.astype(np.float32), TensorProto.BFLOAT16)
    return Constant(array, helper.np_dtype_to_tensor_dtype(array.dtype))


def _round_to(array, elem_type):
    if elem_type == TensorProto.BFLOAT16:
        import ml_dtypes

        return np.asarray(array).astype(ml_dtypes.bfloat16).astype(np.float32)
    return np.asarray(array).astype(helper.tensor_dtype_to_np_dtype(elem_type))


def _axes(node, inputs, opset, position=1):
    """Axes given as an attribute (older opsets) or as input `position` (newer)."""
    attributes = node_attributes(node)
    if "axes" in attributes:
        return [int(a) for a in attributes["axes"]]
    if len(inputs) > position and inputs[position] is not None:
        return [int(a) for a in inputs[position].array.reshape(-1)]
    return None


def _evaluate_by_hand(node, inputs, opset):
    op = node.op_type
    attributes = node_attributes(node)
    first = inputs[0] if inputs else None
    if op == "Identity":
        return first
    if op == "Cast":
        to = int(attributes["to"])
        return Constant(_round_to(first.array, to), to)
    if op == "ConstantOfShape":
        shape = [int(d) for d in first.array.reshape(-1)]
        fill = attributes.get("value")
        if fill is None:
            return Constant(np.zeros(shape, dtype=np.float32), TensorProto.FLOAT)
        value = tensor_to_array(fill).reshape(-1)[0]
        return Constant(np.full(shape, value, dtype=value.dtype), fill.data_type)
    if op == "Reshape":
        if "shape" in attributes:
            target = [int(d) for d in attributes["shape"]]
        else:
            target = [int(d) for d in inputs[1].array.reshape(-1)]
        if not attributes.get("allowzero", 0):
            target = [first.array.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return Constant(first.array.reshape(target), first.elem_type)
    if op == "Unsqueeze":
        axes = _axes(node, inputs, opset)
        rank = first.array.ndim + len(axes)
        array = first.array
        for axis in sorted(a % rank for a in axes):
            array = np.expand_dims(array, axis)
        return Constant(array, first.elem_type)
    if op == "Squeeze":
        axes = _axes(node, inputs, opset)
        if axes is None:
            return Constant(np.squeeze(first.array), first.elem_type)
        return Constant(np.squeeze(first.array, axis=tuple(a % first.array.ndim for a in axes)), first.elem_type)
    if op == "Concat":
        return Constant(np.concatenate([v.array for v in inputs if v is not None], axis=int(attributes["axis"])),
                        first.elem_type)
    if op == "Transpose":
        return Constant(np.transpose(first.array, attributes.get("perm")), first.elem_type)
    if op == "Flatten":
        axis = int(attributes.get("axis", 1)) % max(first.array.ndim, 1)
        outer = int(np.prod(first.array.shape[:axis], dtype=np.int64))
        return Constant(first.array.reshape(outer, -1), first.elem_type)
    raise NotImplementedError(op)


def _evaluate_by_reference(node, inputs, opset, output_position):
    from onnx.reference import ReferenceEvaluator

    if any(v is not None and v.elem_type == TensorProto.BFLOAT16 for v in inputs):
        return None
    feeds = {name: value.array for name, value in zip(node.input, inputs) if name}
    evaluator = ReferenceEvaluator(node, opsets={"": opset})
    outputs = evaluator.run(None, feeds)
    return _constant_from_array(outputs[output_position])
