"""The driver of the fold pass: the rules on every node of every graph, once, in topological order.

Every inference-mode BatchNormalization, and every Mul/Add/Sub/Div by a constant that varies only along
the channel axis, is a site (foldnorm.fold.core.sites). For each site the rules of foldnorm.fold.core.rules are
tried in table order; the first whose condition matches applies. A BatchNormalization no rule folds
stays as it is (onnxruntime runs it in one pass, Mul and Add in two), unless per-channel Mul/Add/Sub/Div
after it merge into one Mul and one Add that replace them all (or rewrite_bn asks for the rewrite); one in
training mode, or with parameters computed at run
time, is left exactly as it is. If/Loop/Scan bodies are visited by the same loop. Every edit goes through
the graph's index (foldnorm.fold.core.graph_index), so the pass is linear in the size of the model.
"""
import onnx
import onnx.inliner

from ..report import Cause
from .context import FoldContext, Refused
from .graph_index import GraphIndex, remove_unused
from ..io.modelio import check_opset
from ..io.proto import attribute_graphs, is_default_domain
from .rules import RULES
from .sites import BATCH_NORM, SITE_OPS, batch_norm_site


def fold_graph(ctx, index):
    """Run the rules on every node of one graph, then on each of its subgraphs."""
    ctx.indexes.append(index)
    for node in list(index.nodes):
        if index.is_removed(node) or not is_default_domain(node) or node.op_type not in SITE_OPS:
            continue
        if node.op_type == BATCH_NORM:
            site = batch_norm_site(ctx, index, node)
            if isinstance(site, Refused):
                ctx.outcome(index, node, action="left", reason=site.reason, cause=site.cause)
                continue
        refusals = []
        for rule in RULES:
            if node.op_type not in rule.op_types:
                continue
            match = rule.condition(ctx, index, node)
            if isinstance(match, Refused):
                if match.reason and match.reason not in refusals:
                    refusals.append(match.reason)
                continue
            if rule.fallback and refusals:
                match.reason = "%s; it could not fold: %s" % (match.reason, "; ".join(refusals))
            rule.apply(ctx, index, node, match)
            del match  # its arrays (a layer's old and new weights) are not kept while the next site folds
            break
        else:
            if node.op_type == BATCH_NORM:
                ctx.outcome(index, node, action="left", reason="; ".join(refusals) or "no rule applies",
                            cause=Cause.NO_ABSORBER)
    for node in index.live_nodes():
        for label, subgraph in attribute_graphs(node):
            child = GraphIndex(subgraph, path="%s/%s.%s" % (index.path, index.label(node).lstrip("/"), label),
                               names=ctx.names, opset=ctx.opset, parent=index,
                               inputs_are_constant=True, constants_as_nodes=ctx.ir_version < 4, types=ctx.types,
                               held=ctx.held)
            fold_graph(ctx, child)


def _holds_batch_norm(nodes):
    for node in nodes:
        if node.op_type == BATCH_NORM and is_default_domain(node):
            return True
        if any(_holds_batch_norm(graph.node) for _, graph in attribute_graphs(node)):
            return True
    return False


def inline_functions_holding_batch_norm(model):
    """Inline the model's local functions (torch's export_modules_as_functions writes them) when any of
    them holds a BatchNormalization: the pass folds graphs, where a function's weights are in reach.
    Returns the names of the functions inlined (none when no function holds one)."""
    if not any(_holds_batch_norm(function.node) for function in model.functions):
        return []
    names = sorted({function.name for function in model.functions})
    model.CopyFrom(onnx.inliner.inline_local_functions(model))
    return names


def fold_in_place(model, *, rewrite_bn=False, fold_through_qdq=False, fold_input_initializers=False, held=None):
    """Run the pass on `model` itself; returns the list of NodeOutcome.

    rewrite_bn: a BatchNormalization no rule folds becomes Mul and Add even when nothing merges into them;
    fold_input_initializers: an initializer the main graph also lists as an input is a constant; held: the
    HeldArrays for the large weights the pass writes (None: written into the protobuf).
    """
    opset = check_opset(model)
    if opset is None:
        return []
    ctx = FoldContext(model, opset, rewrite_bn=rewrite_bn, fold_through_qdq=fold_through_qdq, held=held)
    main = GraphIndex(model.graph, path="main", names=ctx.names, opset=opset,
                      inputs_are_constant=model.ir_version < 4 or fold_input_initializers,
                      constants_as_nodes=model.ir_version < 4, types=ctx.types, held=held)
    fold_graph(ctx, main)
    remove_unused(ctx.indexes)
    for index in reversed(ctx.indexes):
        index.commit()
    return ctx.outcomes
