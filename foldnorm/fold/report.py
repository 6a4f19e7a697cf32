"""What the fold pass did, node by node: the FoldReport that `foldnorm fold` prints and writes as JSON."""
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from enum import Enum

from .errors import PYTHON_WORDS, word
from .io.proto import attribute_graphs

NORMALIZATION_OPS = ("BatchNormalization",)
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Action(str, Enum):
    """What happened to a node (a str, so that it compares and serializes as its value)."""

    FOLDED = "folded"
    REWRITTEN = "rewritten"
    LEFT = "left"

    def __str__(self):
        return self.value


class Cause(str, Enum):
    """Why a normalization was not folded: the kind of reason its outcome gives."""

    TRAINING_MODE = "training_mode"                  # it normalizes with each batch's own statistics
    STATISTICS_READ = "statistics_read"              # a running-statistics output is read
    PARAMETER_INPUT = "parameter_input"              # a parameter is a graph input, given at run time
    PARAMETER_OVERRIDABLE = "parameter_overridable"  # a parameter is an initializer also listed as an input
    PARAMETER_COMPUTED = "parameter_computed"        # a parameter is computed at run time (or too large)
    INVALID = "invalid"                              # its inputs or parameters do not form a per-channel map
    NO_ABSORBER = "no_absorber"                      # no layer next to it can take its map

    def __str__(self):
        return self.value


# What each cause says in the one sentence of "nothing was folded"; a cause not listed is told by the
# first such node's own reason.
CAUSE_SUMMARY = {
    Cause.TRAINING_MODE: "in training mode (they normalize with each batch's statistics)",
    Cause.PARAMETER_INPUT: "whose parameters are graph inputs (re-export with the parameters as constants)",
    Cause.PARAMETER_OVERRIDABLE: "whose parameters are initializers also listed as graph inputs, which a caller "
                                 "may override (<<fold_input_initializers>> treats them as constants)",
}


@dataclass
class NodeOutcome:
    """What happened to one normalization node, or to a per-channel Mul/Add/Sub/Div that was folded.

    node: the node's name ("<op_type>#<index>" when it has none); graph: "main" or a subgraph path such as
    "main/If_0.then_branch"; action: "folded", "rewritten" (to Mul/Add) or "left"; for "folded", into is
    the op type of what absorbed it and direction how: "backward" (into the producing Conv,
    ConvTranspose, Gemm or MatMul), "forward" (into the only reader), "across" (into the producers of each
    branch of the Add, Sum or Concat named by into), or "merged" (into the Mul/Add that replaces a
    BatchNormalization; into is "Mul/Add"); reason: one sentence saying why; quantized: for a fold into a
    layer with a quantized weight, what it did to the integers (foldnorm.fold.quantized.rules.QuantizedFold).
    """

    node: str
    op_type: str
    graph: str
    action: Action
    reason: str
    into: str | None = None
    direction: str | None = None
    quantized: object = None
    cause: Cause | None = None
    template: str = field(default="", repr=False, compare=False)  # the reason with its argument placeholders

    def __post_init__(self):
        self.action = Action(self.action)
        self.cause = None if self.cause is None else Cause(self.cause)
        if not self.template:
            self.template, self.reason = self.reason, word(self.reason, PYTHON_WORDS)

    def worded_reason(self, words=None):
        return word(self.template, PYTHON_WORDS if words is None else words)

    @property
    def folded_into(self):
        """How the report names where the node went: "Conv", "Conv (forward)", "across Add", ..."""
        if self.action != "folded":
            return None
        if self.direction == "forward":
            return "%s (forward)" % self.into
        if self.direction == "across":
            return "across %s" % self.into
        if self.direction == "merged":
            return "a Mul/Add rewrite"
        return self.into

    def to_dict(self, words=None):
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "template"}
        values["action"] = self.action.value
        values["cause"] = None if self.cause is None else self.cause.value
        values["reason"] = self.worded_reason(words)
        if is_dataclass(self.quantized):
            values["quantized"] = asdict(self.quantized)
        return values


@dataclass
class FoldReport:
    """The outcome of folding one model.

    nodes_* count every node, subgraphs included; param_bytes_* count initializers and the tensors of
    Constant nodes. fold_seconds is the time of the pass itself (not loading, not verification).
    """

    model: str
    outcomes: list
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    fold_seconds: float
    verification: object = None
    notes: list = field(default_factory=list)
    layers: int = 0  # Conv / ConvTranspose / Gemm / MatMul nodes in the model, subgraphs included

    def normalizations(self):
        return [o for o in self.outcomes if o.op_type in NORMALIZATION_OPS]

    def counts(self):
        """{"normalizations": BatchNormalization nodes found, "found": {op_type: nodes reported},
        "folded": {folded_into: nodes}, "rewritten": nodes, "left": nodes}."""
        return {
            "normalizations": len(self.normalizations()),
            "found": dict(Counter(o.op_type for o in self.outcomes)),
            "folded": dict(Counter(o.folded_into for o in self.outcomes if o.action == "folded")),
            "rewritten": sum(1 for o in self.outcomes if o.action == "rewritten"),
            "left": sum(1 for o in self.outcomes if o.action == "left"),
        }

    def nothing_folded(self, words=None):
        """None when something was folded; otherwise one sentence saying so and the likely reason, its
        arguments worded by `words` (PYTHON_WORDS when None)."""
        words = PYTHON_WORDS if words is None else words
        counts = self.counts()
        if counts["folded"]:
            return None
        found = counts["normalizations"]
        if not found:
            if self.layers:
                return ("nothing was folded: the model has no BatchNormalization; its exporter likely folded "
                        "them already (its %d Conv/Gemm/MatMul layers have none after them)" % self.layers)
            return "nothing was folded: the model has no BatchNormalization and no layer that could absorb one"
        left = [o for o in self.normalizations() if o.action != "folded"]
        causes = []
        for cause, text in CAUSE_SUMMARY.items():
            n = sum(1 for o in left if o.cause == cause)
            if n:
                causes.append("%d %s" % (n, text))
        others = [o for o in left if o.cause not in CAUSE_SUMMARY]
        if others:
            causes.append("%d because %s" % (len(others), others[0].template))
        rewritten = " (%d rewritten as Mul/Add)" % counts["rewritten"] if counts["rewritten"] else ""
        return word("nothing was folded%s: of %d BatchNormalization, %s" % (rewritten, found, "; ".join(causes)),
                    words)

    def to_dict(self, words=None):
        """The report as JSON-ready data; the sentences are worded by `words` (PYTHON_WORDS when None)."""
        words = PYTHON_WORDS if words is None else words
        return {
            "model": self.model,
            "nothing_folded": self.nothing_folded(words),
            "counts": self.counts(),
            "outcomes": [o.to_dict(words) for o in self.outcomes],
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "param_bytes_before": self.param_bytes_before,
            "param_bytes_after": self.param_bytes_after,
            "fold_seconds": self.fold_seconds,
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "notes": [word(note, words) for note in self.notes],
        }

    def format_text(self, *, every_node=False, words=None):
        """The short report the command line prints; every_node=True also lists folded and rewritten
        nodes (what `foldnorm inspect` shows); the arguments it mentions are worded by `words` (Python's,
        PYTHON_WORDS, when None)."""
        counts = self.counts()
        others = {op: n for op, n in counts["found"].items() if op not in NORMALIZATION_OPS}
        found = "%d BatchNormalization" % counts["normalizations"]
        if others:
            found += " (and %s per-channel %s folded along)" % (
                sum(others.values()), "/".join(sorted(others)))
        lines = ["foldnorm: %s" % self.model, "  normalizations found: %s" % found]
        folded = counts["folded"]
        if folded:
            kinds = ", ".join("%s %d" % (into, n) for into, n in sorted(folded.items()))
            lines.append("  folded: %d (%s)" % (sum(folded.values()), kinds))
        else:
            lines.append("  folded: 0")
        lines.append("  rewritten to Mul/Add: %d" % counts["rewritten"])
        lines.append("  left: %d" % counts["left"])
        listed = [o for o in self.outcomes if every_node or o.action == "left"]
        for outcome in listed:
            where = "" if outcome.graph == "main" else " in %s" % outcome.graph
            action = outcome.action if outcome.action != "folded" else "folded into %s" % outcome.folded_into
            lines.append("    - %s (%s%s): %s: %s" % (outcome.node, outcome.op_type, where, action, outcome.template))
        lines.append("  nodes: %d -> %d" % (self.nodes_before, self.nodes_after))
        lines.append("  parameter bytes: %s -> %s" % (format(self.param_bytes_before, ","),
                                                       format(self.param_bytes_after, ",")))
        for note in self.notes:
            lines.append("  note: %s" % note)
        nothing = self.nothing_folded(words)
        if nothing:
            lines.append("  " + nothing)
        if self.verification is not None:
            lines.extend("  " + line for line in self.verification.format_text().splitlines())
        lines.append("  time: %.3f s folding" % self.fold_seconds)
        return word("\n".join(lines), PYTHON_WORDS if words is None else words)



def count_layers(graph):
    """How many Conv / ConvTranspose / Gemm / MatMul nodes a graph and its subgraphs hold."""
    count = 0
    for node in graph.node:
        count += node.op_type in LAYER_OPS
        for _, subgraph in attribute_graphs(node):
            count += count_layers(subgraph)
    return count
