"""The A/B comparison's statistics: one figure's head/base ratio from paired rounds, with a confidence
interval, and the verdict on it.

Each round times the base and the head once each (one worker process per side, the order alternating
round by round), so a round gives one log ratio d = log(head seconds / base seconds). The estimate is the
Hodges-Lehmann estimate of the d's centre (the median of the Walsh averages (d_i + d_j) / 2, i <= j) and
its interval is the matching distribution-free one from Wilcoxon's signed-rank statistic, computed from its
exact null distribution. The only assumption is that, with no real difference, a round's d is as likely
to be +x as -x; alternating the order within the rounds makes a drift of the machine cancel that way too.

A figure is flagged only when both hold: its estimated slowdown exceeds the threshold, and the interval's
lower end is above 1 (the slowdown is significant). The interval's level is set so that the chance that
a same-code comparison flags *any* of its figures is at most `false_alarm` (Bonferroni over the figures).
"""
import functools
import math
from dataclasses import dataclass

DEFAULT_THRESHOLD = 0.10
DEFAULT_FALSE_ALARM = 0.05


def signed_rank_counts(n):
    """counts[s] = how many of the 2**n sign patterns give the signed-rank sum s (s = 0..n(n+1)/2)."""
    counts = [1]
    for rank in range(1, n + 1):
        grown = counts + [0] * rank
        for s, c in enumerate(counts):
            grown[s + rank] += c
        counts = grown
    return counts


@functools.lru_cache(maxsize=None)
def lower_rank(n, alpha):
    """The largest k with P(T <= k - 1) <= alpha under the null, T the signed-rank sum of n rounds.

    The one-sided (1 - alpha) lower confidence bound of the centre is then the k-th smallest Walsh
    average; k == 0 means that n rounds cannot reach that level.
    """
    counts = signed_rank_counts(n)
    total = 2.0 ** n
    cumulative = 0
    k = 0
    while k < len(counts) and (cumulative + counts[k]) / total <= alpha:
        cumulative += counts[k]
        k += 1
    return k


def walsh_averages(values):
    return sorted((values[i] + values[j]) / 2 for i in range(len(values)) for j in range(i, len(values)))


@dataclass
class Comparison:
    """One figure's head/base ratio: the estimate, its interval and the verdict."""

    name: str
    rounds: int
    base_median: float
    head_median: float
    ratio: float
    low: float
    high: float
    confidence: float
    significant: bool
    flagged: bool

    def as_dict(self):
        """As JSON can hold it: an unbounded upper end is None."""
        values = dict(self.__dict__)
        if math.isinf(values["high"]):
            values["high"] = None
        return values


def compare_rounds(name, base, head, threshold=DEFAULT_THRESHOLD, alpha=DEFAULT_FALSE_ALARM):
    """Compare one figure's paired samples (lists of seconds, base[i] and head[i] from round i).

    `alpha` is this figure's one-sided false-alarm chance: the interval has level 1 - 2 * alpha.
    """
    if len(base) != len(head) or not base:
        raise ValueError("base and head need the same, non-zero number of rounds, got %d and %d"
                         % (len(base), len(head)))
    logs = [math.log(h / b) for b, h in zip(base, head)]
    walsh = walsh_averages(logs)
    centre = _median(walsh)
    k = lower_rank(len(logs), alpha)
    low = math.exp(walsh[k - 1]) if k else 0.0
    high = math.exp(walsh[len(walsh) - k]) if k else math.inf
    ratio = math.exp(centre)
    significant = low > 1.0
    return Comparison(
        name=name, rounds=len(logs), base_median=_median(base), head_median=_median(head), ratio=ratio,
        low=low, high=high, confidence=1 - 2 * alpha, significant=significant,
        flagged=significant and ratio > 1 + threshold,
    )


def compare_figures(base_rounds, head_rounds, threshold=DEFAULT_THRESHOLD, false_alarm=DEFAULT_FALSE_ALARM):
    """Comparisons for every figure both sides measured in every round, Bonferroni over the figures.

    base_rounds, head_rounds: {figure name: [seconds of round 0, round 1, ...]}, rounds aligned.
    Returns (comparisons sorted by name, names only base has, names only head has).
    """
    shared = sorted(set(base_rounds) & set(head_rounds))
    alpha = false_alarm / max(1, len(shared))
    comparisons = [compare_rounds(name, base_rounds[name], head_rounds[name], threshold, alpha) for name in shared]
    return comparisons, sorted(set(base_rounds) - set(head_rounds)), sorted(set(head_rounds) - set(base_rounds))


def minimum_rounds(figures, false_alarm=DEFAULT_FALSE_ALARM):
    """The fewest rounds whose interval can exclude 1 at all (the level `compare_figures` uses)."""
    alpha = false_alarm / max(1, figures)
    n = 1
    while lower_rank(n, alpha) == 0:
        n += 1
    return n


def _median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
