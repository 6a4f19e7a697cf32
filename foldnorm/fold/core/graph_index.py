"""An editable index of one ONNX graph (the main graph or an If/Loop/Scan body).

`GraphIndex` knows the node that produces each value and the nodes that read it -- a node whose subgraph
captures an outer value counts as one of its readers --, which values are graph inputs and outputs, and
which are constant (foldnorm.fold.core.constants evaluates them once and caches them). The fold rules edit the
graph only through it: rewiring an input, renaming an output, inserting and removing nodes, adding a
constant under a fresh name. Edits are recorded and written back once per graph by `commit`, so a pass
over the graph costs time linear in its size.
"""
from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper

from .constants import Constant, ConstantTooLarge, evaluate_node
from ..io.external_data import read_referenced_array
from ..io.proto import array_to_tensor, attribute_graphs, is_default_domain, tensor_to_array


# Ops that read their input's shape alone: a fold that keeps a value's shape does not concern them.
SHAPE_ONLY_OPS = ("Shape", "Size")


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
    every initializer to be a graph input, and the graph inputs must stay as they are); types: {value:
    (elem_type, shape)} as shape inference found them, for the ops that read only their input's type
    (CastLike); held: the HeldArrays that keeps the large weights the pass writes.
    """

    def __init__(self, graph, *, path, names, opset, inputs_are_constant, constants_as_nodes, parent=None,
                 types=None, held=None):
        self.graph = graph
        self.held = held
        self.path = path
        self.parent = parent
        self.names = names
        self.opset = opset
        self.inputs_are_constant = inputs_are_constant
        self.constants_as_nodes = constants_as_nodes
        self.types = types or {}

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
        self._too_large = {}
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

    def shape_readers(self, name):
        """The nodes that read only the shape of `name` (Shape, Size), not its values."""
        return [node for node in self.readers(name) if node.op_type in SHAPE_ONLY_OPS and is_default_domain(node)]

    def value_readers(self, name):
        """The nodes that read the values of `name`: every reader but Shape and Size."""
        return [node for node in self.readers(name)
                if not (node.op_type in SHAPE_ONLY_OPS and is_default_domain(node))]

    def only_value_reader(self, name):
        """The single node that reads the values of `name` (Shape and Size may read its shape too), or None
        when it has several, none, or is a graph output."""
        readers = self.value_readers(name)
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0]

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
        except ConstantTooLarge as error:
            self._too_large[name] = "%r %s" % (name, error)
            value = None
        except MemoryError:
            self._too_large[name] = "%r is computed from constants, but evaluating it ran out of memory" % name
            value = None
        except (ValueError, TypeError, KeyError, IndexError, RecursionError, NotImplementedError):
            value = None
        self._constants[name] = value
        return value

    def too_large(self, name):
        """Why a value computed from constants was not evaluated because of its size (its own, or that of a
        value it is computed from), or None."""
        if not name:
            return None
        if name not in self._constants and not self.defines(name):
            return self.parent.too_large(name) if self.parent is not None else None
        self.constant(name)
        return self._too_large.get(name)

    def _evaluate(self, name):
        if name in self.initializers and name not in self._removed_initializers:
            if name in self.graph_inputs and not self.inputs_are_constant:
                return None
            tensor = self.initializers[name]
            if tensor.data_location == TensorProto.EXTERNAL:
                array = read_referenced_array(tensor, self.held)  # None unless foldnorm left it in its file
                return None if array is None else Constant(array, tensor.data_type)
            return Constant(tensor_to_array(tensor), tensor.data_type)
        node = self.producer.get(name)
        if node is None or not is_default_domain(node):
            return None
        inputs = []
        for position, input_name in enumerate(node.input):
            if not input_name:
                inputs.append(None)
                continue
            if node.op_type == "CastLike" and position == 1:  # only its element type is read
                inputs.append(self._type_only(input_name))
                continue
            value = self.constant(input_name)
            if value is None:
                reason = self.too_large(input_name)
                if reason is not None:
                    self._too_large[name] = reason
                return None
            inputs.append(value)
        if any(value is None for value, input_name in zip(inputs, node.input) if input_name):
            return None
        return evaluate_node(node, inputs, self.opset, list(node.output).index(name))

    def _type_only(self, name):
        """An empty Constant of the value's element type (constant or not), or None when it is unknown."""
        value = self.constant(name)
        if value is not None:
            return value
        elem_type = (self.types.get(name) or (0, None))[0]
        if not elem_type:
            return None
        return Constant(np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(elem_type)), elem_type)

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
                self._constants.pop(old, None)  # a replaced weight is decoded again if read again
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
        if self.constants_as_nodes:
            tensor = array_to_tensor(array, name, elem_type)
            node = helper.make_node("Constant", [], [name], name=self.names.fresh(name + "_constant"), value=tensor)
            self._leading.append(node)
            self.labels[id(node)] = node.name
            self.producer[name] = node
        else:
            # Written straight into the graph: initializer.append would copy a large weight again, slowly.
            self.initializers[name] = array_to_tensor(array, name, elem_type, into=self.graph.initializer.add(),
                                                       held=self.held)
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
            # Deleted in place: re-adding the kept ones would copy every weight of the model.
            for position in reversed(range(len(self.graph.initializer))):
                if self.graph.initializer[position].name in self._removed_initializers:
                    del self.graph.initializer[position]
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
