"""The A/B comparison's statistics on synthetic rounds: exact signed-rank tables, the interval's coverage,
a real 15% slowdown flagged, and the false-alarm rate of same-code comparisons.

The noise model: each worker's figure (a median of 5 calls) is off by a log-normal factor of sigma 0.05
(a quiet runner) to 0.5 (a very busy one), and one sample in 50 is an outlier 1.3x to 3x slower (a
neighbour took the core for a while). A comparison has 25 figures (12 kernels at 2 thread counts and the
fold) and 20 rounds, as the quick A/B.
"""
import itertools
import math
import random

import pytest

from benchmarks import ab, stats

FIGURES = 25
ROUNDS = 20
OUTLIERS = 0.02


def _brute_force_counts(n):
    counts = [0] * (n * (n + 1) // 2 + 1)
    for signs in itertools.product((0, 1), repeat=n):
        counts[sum(rank for rank, s in zip(range(1, n + 1), signs) if s)] += 1
    return counts


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_signed_rank_counts_match_the_enumeration_of_sign_patterns(n):
    assert stats.signed_rank_counts(n) == _brute_force_counts(n)


@pytest.mark.parametrize("n, alpha", [(10, 0.025), (12, 0.002), (15, 0.0005), (6, 0.05)])
def test_lower_rank_is_the_largest_rank_whose_tail_stays_within_alpha(n, alpha):
    counts = _brute_force_counts(n)
    k = stats.lower_rank(n, alpha)
    assert sum(counts[:k]) / 2**n <= alpha < sum(counts[: k + 1]) / 2**n


def test_too_few_rounds_give_an_unbounded_interval_and_never_flag():
    comparison = stats.compare_rounds("f", [1.0, 1.0, 1.0], [2.0, 2.1, 2.2], alpha=0.01)
    assert comparison.low == 0.0 and math.isinf(comparison.high) and not comparison.flagged
    assert comparison.as_dict()["high"] is None
    assert stats.minimum_rounds(25) == 9  # 2**-9 <= 0.05 / 25 < 2**-8


def test_estimate_and_interval_of_a_constant_ratio():
    base = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    comparison = stats.compare_rounds("f", base, [1.2 * b for b in base], threshold=0.1, alpha=0.01)
    assert comparison.ratio == pytest.approx(1.2) and comparison.low == pytest.approx(1.2)
    assert comparison.high == pytest.approx(1.2) and comparison.flagged
    assert comparison.base_median == 5.5 and comparison.head_median == pytest.approx(6.6)
    small = stats.compare_rounds("f", base, [1.05 * b for b in base], threshold=0.1, alpha=0.01)
    assert small.significant and not small.flagged  # significant, but within the threshold
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        stats.compare_rounds("f", [1.0], [1.0, 2.0])


def _sample(rng, sigma, outliers=OUTLIERS):
    value = math.exp(rng.gauss(0, sigma))
    if rng.random() < outliers:
        value *= rng.uniform(1.3, 3.0)
    return value


def _rounds(rng, sigma, factor=1.0, outliers=OUTLIERS):
    base = [_sample(rng, sigma, outliers) for _ in range(ROUNDS)]
    head = [factor * _sample(rng, sigma, outliers) for _ in range(ROUNDS)]
    return base, head


def test_the_interval_covers_the_true_ratio_at_least_at_its_level():
    rng = random.Random(1)
    alpha = 0.05
    misses = 0
    trials = 2000
    for _ in range(trials):
        comparison = stats.compare_rounds("f", *_rounds(rng, 0.1, factor=1.2), alpha=alpha)
        misses += comparison.low > 1.2
    assert misses / trials <= alpha + 0.01


@pytest.mark.parametrize("outliers, power", [(0.0, 0.99), (OUTLIERS, 0.90)])
def test_a_real_15_percent_slowdown_is_flagged(outliers, power):
    rng = random.Random(2)
    trials = 200
    flagged = wrongly = 0
    for _ in range(trials):
        base, head = {}, {}
        for index in range(FIGURES):
            base["f%d" % index], head["f%d" % index] = _rounds(rng, 0.05, 1.15 if index == 0 else 1.0, outliers)
        comparisons, _, _ = stats.compare_figures(base, head)
        flagged += comparisons[0].flagged
        wrongly += any(c.flagged for c in comparisons[1:])
    # Measured: 200/200 without outliers, 189/200 with them (two outliers in the head's 20 rounds can
    # hide the slowdown). The power falls with the noise: 66% at sigma 0.10, 28% at 0.15 (measured, 200 trials).
    assert flagged / trials >= power
    assert wrongly == 0


@pytest.mark.parametrize("sigma, trials", [(0.05, 300), (0.15, 300), (0.50, 1000)])
def test_pure_noise_is_flagged_in_fewer_than_5_percent_of_same_code_comparisons(sigma, trials):
    rng = random.Random(3)
    false_alarms = 0
    for _ in range(trials):
        base, head = {}, {}
        for index in range(FIGURES):
            base["f%d" % index], head["f%d" % index] = _rounds(rng, sigma)
        comparisons, _, _ = stats.compare_figures(base, head)
        false_alarms += any(c.flagged for c in comparisons)
    # At most 5% by construction (Bonferroni over the figures); the 10% threshold makes it far rarer while
    # the noise is small next to it. Measured: 0% at sigma 0.05, 3.3% at 0.15, 4.3% at 0.50.
    assert false_alarms / trials < 0.05


def _results(busy, clock_flagged, counts_flagged, counts=True):
    timings = [{"name": "kernel/a/t1", "flagged": clock_flagged}]
    section = {"rows": [{"key": "a", "flagged": counts_flagged}]} if counts else {"skipped": "no valgrind"}
    return {"machine_check": {"busy": busy}, "timings": timings, "counts": section}


@pytest.mark.parametrize("busy, clock, counted, counts, flagged", [
    (False, False, False, True, False),
    (False, True, False, True, True),  # a quiet machine: the clock may flag
    (True, True, False, True, False),  # a busy one: only the counts decide
    (True, False, True, True, True),
    (True, True, False, False, False),  # busy, and no counts: nothing can flag (and the report says so)
    (False, True, False, False, True),
])
def test_on_a_busy_machine_the_verdict_follows_the_deterministic_counts_alone(busy, clock, counted, counts, flagged):
    verdict = ab.verdict(_results(busy, clock, counted, counts))
    assert verdict["flagged"] is flagged
    assert verdict["clock_reliable"] is (not busy)
