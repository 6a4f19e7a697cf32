"""Fold scaling: how the time of `foldnorm.fold_model` grows with the size of the model.

The model is `models.conv_bn_chain`: N pairs of Conv+BatchNormalization (each followed by a Relu), with
every pair the same size, so a fold that is linear in the model's size takes the same time per pair at
every N. Each N is folded once with verification (which also checks that the fold is right), then timed
without it, the sizes interleaved round by round like every other contender.
"""
import time

from .harness import Contender, first_line, measure, paired_ratio
from .models import conv_bn_chain

NAME = "conv_bn_chain"
TARGET_PAIRS = 1000
TARGET_SECONDS = 2.0


def _batch_norms(model):
    return sum(1 for node in model.graph.node if node.op_type == "BatchNormalization")


def run(pairs_list, repeats, settle=0.0):
    """Fold a chain of each size in `pairs_list`; returns the JSON-ready result (`skipped` if it cannot run)."""
    result = {"name": NAME, "source": "generated, 1x8x8x8, Conv 3x3 -> BatchNormalization -> Relu per pair",
              "rows": [], "notes": []}
    try:
        from foldnorm.fold import fold_model
    except ImportError as error:
        result["skipped"] = "foldnorm.fold is not available yet (%s)" % error
        return result
    chains = {}
    for pairs in pairs_list:
        model = conv_bn_chain(pairs)
        row = {"pairs": pairs, "batch_norm_nodes": _batch_norms(model)}
        start = time.perf_counter()
        try:
            folded, fold_report = fold_model(model, verify=True)
        except Exception as error:  # a refused or diverging fold is a finding to report, not a reason to stop
            result["notes"].append("%d pairs: fold_model failed: %s" % (pairs, first_line(error)))
            continue
        row["seconds_with_verify"] = time.perf_counter() - start
        row["batch_norm_nodes_left"] = _batch_norms(folded)
        row["verify_max_rel_error"] = max(o.max_rel_error for o in fold_report.verification.outputs)
        result["rows"].append(row)
        chains[pairs] = model

    # The verified fold above was each size's warm-up.
    contenders = [Contender("fold/%d" % pairs, 1, lambda model=model: fold_model(model, verify=False))
                  for pairs, model in chains.items()]
    samples = measure(contenders, repeats, warmup=0, settle=settle) if contenders else {}
    smallest = min(chains, default=None)
    for row in result["rows"]:
        mine = samples["fold/%d@1" % row["pairs"]]
        row["fold"] = mine.summary()
        row["seconds_per_pair"] = row["fold"]["median"] / row["pairs"]
        # Time per pair against the smallest chain's, paired per round: 1.0 means linear.
        ratio = paired_ratio(mine, samples["fold/%d@1" % smallest])
        scale = smallest / row["pairs"]
        row["per_pair_vs_smallest"] = dict(ratio, **{k: ratio[k] * scale for k in ("median", "min", "max")})
    result["smallest_pairs"] = smallest
    result["target"] = evaluate_target(result["rows"], pairs_list)
    return result


def evaluate_target(rows, pairs_list):
    """The fold-time target from this run's rows: met True/False, or None (with `why`) when not measured."""
    verdict = {"target": "fold of %d Conv+BN pairs < %g s" % (TARGET_PAIRS, TARGET_SECONDS),
               "pairs": TARGET_PAIRS, "limit": TARGET_SECONDS, "measured": None, "met": None}
    row = next((r for r in rows if r["pairs"] == TARGET_PAIRS and "fold" in r), None)
    if row is None:
        verdict["why"] = ("the %d-pair fold failed (see the notes)" % TARGET_PAIRS if TARGET_PAIRS in pairs_list
                          else "not in this run (sizes: %s pairs)" % ", ".join(map(str, pairs_list)))
        return verdict
    verdict["measured"] = row["fold"]
    verdict["met"] = row["fold"]["median"] < TARGET_SECONDS and row["batch_norm_nodes_left"] == 0
    if row["batch_norm_nodes_left"]:
        verdict["why"] = "%d BatchNormalization nodes left unfolded" % row["batch_norm_nodes_left"]
    return verdict
