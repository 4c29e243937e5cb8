"""kvbench.stats on hand-computed cases, plus a coverage simulation of the bootstrap interval and the
exact coverage of the interval reported for 0/1 means."""

import math

import numpy as np
import pytest

from kvbench.errors import ConfigError
from kvbench.stats import (
    RESAMPLES,
    Interval,
    bootstrap_ci,
    bootstrap_of_successes,
    coverage,
    coverage_table,
    detectable_drop_paired,
    detectable_drop_unpaired,
    detectable_effect,
    holm,
    indistinguishable_from_best,
    mcnemar_p,
    mcnemar_power,
    mean_ci,
    paired_comparison,
    pareto_frontier,
    retention_auc,
    retention_auc_ci,
    retention_ci,
    sample_size_table,
    samples_needed_paired,
    samples_needed_unpaired,
    sign_flip_p,
    task_mean_ci,
    wilson_ci,
)


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


# --- bootstrap intervals


def test_all_equal_scores_give_a_zero_width_interval():
    for clusters in (None, list("aabbccddee")):
        ci = bootstrap_ci([0.3] * 10, clusters)
        assert ci.low == ci.high  # exactly: every resample sums the same values
        assert ci.low == pytest.approx(0.3) and ci.estimate == pytest.approx(0.3)
        assert ci.n == 10 and ci.resamples == RESAMPLES


def test_bernoulli_interval_is_close_to_wilson():
    scores = [1.0] * 30 + [0.0] * 70
    ci = bootstrap_ci(scores)
    low, high = wilson(30, 100)  # 0.2189, 0.3958
    assert ci.estimate == pytest.approx(0.3)
    assert ci.low == pytest.approx(low, abs=0.02) and ci.high == pytest.approx(high, abs=0.02)
    assert ci.method == "percentile bootstrap" and ci.level == 0.95


def test_interval_is_deterministic_for_a_seed():
    scores = np.random.default_rng(3).random(40).tolist()
    assert bootstrap_ci(scores, seed=7) == bootstrap_ci(scores, seed=7)
    assert bootstrap_ci(scores, seed=7) != bootstrap_ci(scores, seed=8)


def test_interval_columns_are_on_the_table_scale():
    ci = Interval(estimate=0.5, low=0.25, high=0.75, n=8, method="percentile bootstrap", resamples=10, seed=0)
    assert ci.columns() == {"ci_low": 25.0, "ci_high": 75.0}


def test_clustered_interval_is_wider_when_clusters_are_correlated():
    # 10 contexts of 5 questions each; a context's questions all succeed or all fail
    scores = [float(c % 2) for c in range(10) for _ in range(5)]
    clusters = [c for c in range(10) for _ in range(5)]
    plain, clustered = bootstrap_ci(scores), bootstrap_ci(scores, clusters)
    assert clustered.method == "clustered percentile bootstrap"
    assert clustered.estimate == plain.estimate == 0.5
    # 10 independent units instead of 50: about sqrt(5) times wider
    assert clustered.high - clustered.low > 1.8 * (plain.high - plain.low)


def test_one_sample_per_cluster_is_the_plain_bootstrap():
    scores = np.random.default_rng(4).random(30).tolist()
    assert bootstrap_ci(scores, [f"c{i}" for i in range(30)]) == bootstrap_ci(scores)


def test_unequal_clusters_weight_every_sample_once():
    # cluster sums 3 (size 3) and 0 (size 1): resampling {a, a} -> 1, {a, b} -> 3/4, {b, b} -> 0
    ci = bootstrap_ci([1.0, 1.0, 1.0, 0.0], ["a", "a", "a", "b"], level=0.4)
    assert ci.estimate == 0.75
    # P(1) = P(0) = 1/4, P(3/4) = 1/2: the 30% and 70% quantiles are both 3/4
    assert ci.low == ci.high == 0.75


@pytest.mark.parametrize(
    "scores, clusters",
    [([], None), ([0.5, float("nan")], None), ([0.5, 1.0], ["a"]), ([[0.5]], None)],
)
def test_bad_bootstrap_input_is_refused(scores, clusters):
    with pytest.raises(ConfigError):
        bootstrap_ci(scores, clusters)


def test_coverage_of_bernoulli_n50():
    # 500 datasets of 50 Bernoulli(0.6) samples: a 95% interval should cover 0.6 in 92-98% of them
    rng = np.random.default_rng(2024)
    datasets = (rng.random((500, 50)) < 0.6).astype(float)
    covered = 0
    for i, data in enumerate(datasets):
        ci = bootstrap_ci(data, seed=i)
        covered += ci.low <= 0.6 <= ci.high
    assert 0.92 <= covered / 500 <= 0.98


def test_clustered_interval_is_the_bootstrap_of_the_clusters_when_they_agree_within():
    # 8 contexts of 3 questions, all alike within a context: the clustered interval is the plain
    # bootstrap of the 8 context means (the same draws: one unit per context, equal sizes)
    means = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    scores = [m for m in means for _ in range(3)]
    clusters = [c for c in range(8) for _ in range(3)]
    clustered, contexts = bootstrap_ci(scores, clusters), bootstrap_ci(means)
    assert (clustered.low, clustered.high) == (contexts.low, contexts.high)
    assert clustered.n == 24 and clustered.method == "clustered percentile bootstrap"
    assert mean_ci(scores, clusters) == clustered  # shared contexts: never Wilson's


def test_wilson_interval_by_hand():
    z = 1.959964
    # 0 of 10: [0, z^2 / (10 + z^2)]; 10 of 10: [10 / (10 + z^2), 1]; 30 of 100 as tabulated (0.2189, 0.3958)
    assert (wilson_ci(0, 10).low, wilson_ci(0, 10).high) == (0.0, pytest.approx(z * z / (10 + z * z)))
    assert (wilson_ci(10, 10).low, wilson_ci(10, 10).high) == (pytest.approx(10 / (10 + z * z)), 1.0)
    ci = wilson_ci(30, 100)
    assert (ci.low, ci.high) == (pytest.approx(wilson(30, 100)[0]), pytest.approx(wilson(30, 100)[1]))
    assert (ci.estimate, ci.n, ci.method, ci.resamples, ci.seed) == (0.3, 100, "Wilson score", None, None)
    with pytest.raises(ConfigError):
        wilson_ci(3, 2)


def test_the_reported_interval_is_wilsons_for_independent_0_1_scores_only():
    hits = [1.0] * 20
    assert mean_ci(hits) == wilson_ci(20, 20)  # not the bootstrap's [1, 1]
    assert mean_ci(hits, [f"c{i}" for i in range(20)]) == wilson_ci(20, 20)  # one sample per cluster
    assert mean_ci([1.0, 0.5, 0.0]) == bootstrap_ci([1.0, 0.5, 0.0])
    with pytest.raises(ConfigError, match="one key per sample"):
        mean_ci(hits, ["a"])


def test_exact_coverage_by_hand():
    # n = 1: k = 1 (probability p) gives Wilson [1 / (1 + z^2), 1] = [0.207, 1], which holds 0.5 and 0.9;
    # k = 0 gives [0, 0.793], which holds 0.5 but not 0.9
    assert coverage(wilson_ci, 1, 0.5) == pytest.approx(1.0)
    assert coverage(wilson_ci, 1, 0.9) == pytest.approx(0.9)
    # the bootstrap of one sample is the sample itself: it never holds a p strictly inside (0, 1)
    assert coverage(bootstrap_of_successes, 1, 0.9) == 0.0


def test_the_reported_interval_covers_0_1_means_near_the_extremes():
    # near 100% at small n the percentile bootstrap collapses (every resample of an all-correct run is
    # correct); the reported interval (Wilson's) keeps 90-99% coverage where the bootstrap falls far short
    for n, p in [(10, 0.95), (20, 0.95), (20, 0.99), (50, 0.99), (50, 0.02)]:
        assert 0.90 <= coverage(mean_ci_of_successes, n, p) <= 0.99, (n, p)
    assert coverage(bootstrap_of_successes, 20, 0.95) < 0.7
    assert coverage(bootstrap_of_successes, 50, 0.99) < 0.5
    table = coverage_table(ns=(10,), ps=(0.95,))
    assert "| percentile bootstrap, n = 10 | 40.0 |" in table and "| Wilson score, n = 10 | 91.4 |" in table


def mean_ci_of_successes(k, n):
    return mean_ci([1.0] * k + [0.0] * (n - k))


# --- tests of a difference


@pytest.mark.parametrize(
    "b, c, p",
    [(0, 5, 0.0625), (5, 0, 0.0625), (3, 3, 1.0), (0, 0, 1.0), (7, 8, 1.0),
     (1, 4, 12 / 32),  # 2 * (1 + 5) / 2^5
     (2, 8, 112 / 1024)],  # 2 * (1 + 10 + 45) / 2^10
)
def test_mcnemar_on_hand_computed_tables(b, c, p):
    assert mcnemar_p(b, c) == pytest.approx(p, abs=1e-15)


def test_sign_flip_on_hand_enumerable_cases():
    # +-0.5 +-1 +-2: sums 3.5 1.5 2.5 0.5 and negatives; |sum| >= |0.5 - 1 + 2| = 1.5 for 6 of 8
    assert sign_flip_p([0.5, -1.0, 2.0]) == (0.75, "sign-flip exact")
    # +-1 +-2 +-3 reach |6| in 2 of 8 patterns; a zero difference changes nothing
    assert sign_flip_p([1.0, 2.0, 3.0, 0.0]) == (0.25, "sign-flip exact")
    # 16 patterns of +-1 +-1 +-0.5 +-2, |sum| >= 3.5 in 4
    assert sign_flip_p([1.0, 1.0, -0.5, 2.0])[0] == 0.25
    # the two 1s share a cluster: +-2 +-0.5 +-2, |sum| >= 3.5 in 4 of 8
    assert sign_flip_p([1.0, 1.0, -0.5, 2.0], ["a", "a", "b", "c"])[0] == 0.5
    assert sign_flip_p([0.0, 0.0])[0] == 1.0


def test_sign_flip_on_equal_magnitudes_is_mcnemar():
    # differences of +-0.5: the sign-flip test is the exact binomial test, exactly (2^10 patterns)...
    differences = [-0.5] * 2 + [0.5] * 8 + [0.0] * 5
    assert sign_flip_p(differences) == (pytest.approx(mcnemar_p(2, 8), abs=1e-15), "sign-flip exact")
    # ...and within Monte Carlo error (about 0.0004 here) when 2^30 patterns are too many
    p, test = sign_flip_p([-0.5] * 8 + [0.5] * 22, seed=1)
    assert test == "sign-flip Monte Carlo (100000 draws)"
    assert p == pytest.approx(mcnemar_p(8, 22), abs=0.002)
    assert sign_flip_p([-0.5] * 8 + [0.5] * 22, seed=1)[0] == p


def test_paired_comparison_of_0_1_scores_uses_mcnemar():
    full = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": 1.0, "f": 1.0, "only-full": 1.0}
    run = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0, "e": 0.0, "f": 0.0, "only-run": 1.0}
    result = paired_comparison(full, run)
    assert (result.n, result.lost, result.gained) == (6, 5, 0)
    assert result.diff == pytest.approx(-5 / 6)
    assert (result.p, result.test) == (0.0625, "McNemar exact")
    # differences -1 x5, 0 x1: resamples of six -1s are common (1/3), so the 2.5% quantile is -1
    assert result.ci_low == -1.0 and result.diff < result.ci_high <= -0.5
    columns = result.columns()
    assert set(columns) == {"vs_full_diff", "vs_full_ci_low", "vs_full_ci_high", "vs_full_p", "lost", "gained"}
    assert columns["vs_full_diff"] == pytest.approx(-500 / 6) and columns["vs_full_ci_low"] == -100.0
    assert (columns["vs_full_p"], columns["lost"], columns["gained"]) == (0.0625, 5, 0)
    assert paired_comparison(full, run) == result


def test_paired_comparison_of_continuous_scores_uses_sign_flip():
    full = {"a": 0.5, "b": 0.25, "c": 1.0, "d": 0.75}
    run = {"a": 1.0, "b": 0.25, "c": 0.0, "d": 0.5}
    result = paired_comparison(full, run)
    # differences 0.5, 0, -1, -0.25: |sum| 0.75; of the 8 patterns of +-0.5 +-1 +-0.25, 6 reach it
    assert (result.p, result.test) == (0.75, "sign-flip exact")
    assert (result.lost, result.gained) == (2, 1)
    assert result.diff == pytest.approx(-0.1875)
    assert result.ci_method == "percentile bootstrap"


def test_paired_comparison_with_shared_contexts_is_clustered():
    full = {"q1": 1.0, "q2": 1.0, "q3": 1.0, "q4": 0.0}
    run = {"q1": 0.0, "q2": 0.0, "q3": 1.0, "q4": 1.0}
    contexts = {"q1": "ctx1", "q2": "ctx1", "q3": "ctx2", "q4": "ctx3"}
    result = paired_comparison(full, run, contexts)
    # 0/1 scores, but two compared questions share ctx1: sign flips of cluster sums -2, 0, +1
    # (4 patterns, |sum| >= 1 in all), not McNemar on b=1, c=2
    assert (result.p, result.test) == (1.0, "sign-flip exact")
    assert result.ci_method == "clustered percentile bootstrap"
    assert (result.lost, result.gained) == (2, 1)


def test_paired_comparison_refuses_unpairable_runs():
    with pytest.raises(ConfigError, match="share no sample id"):
        paired_comparison({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ConfigError, match="no cluster key"):
        paired_comparison({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 0.0}, {"a": "ctx"})


def test_holm_on_hand_computed_cases():
    # sorted 0.005 0.01 0.03 0.04 times 4 3 2 1 = 0.02 0.03 0.06 0.04 -> running max 0.02 0.03 0.06 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.02, 0.5]) == pytest.approx([0.04, 0.5])
    assert holm([0.6, 0.5]) == [1.0, 1.0]
    assert holm([]) == []
    with pytest.raises(ConfigError):
        holm([0.5, 1.5])


def test_best_is_marked_alone_only_when_it_beats_every_run_significantly():
    ids = [f"s{i}" for i in range(20)]
    perfect = dict.fromkeys(ids, 1.0)
    one_miss = {**perfect, "s0": 0.0}  # McNemar b=1, c=0: p = 1
    # b=6, c=0: p = 2 / 2^6 = 0.031 < 0.05, but Holm doubles it (the second smallest of three)
    six_miss = {**perfect, **dict.fromkeys(ids[:6], 0.0)}
    none = dict.fromkeys(ids, 0.0)  # p = 2 / 2^20, Holm x3
    runs = {"none": none, "six": six_miss, "one": one_miss, "perfect": perfect}
    assert indistinguishable_from_best(runs) == ["six", "one", "perfect"]
    assert indistinguishable_from_best({"six": six_miss, "perfect": perfect}) == ["perfect"]
    assert indistinguishable_from_best({"none": none, "perfect": perfect}) == ["perfect"]
    # equal means: the first is the best, and the other is indistinguishable from it
    assert indistinguishable_from_best({"a": one_miss, "b": {**perfect, "s1": 0.0}}) == ["a", "b"]


# --- power


def test_mcnemar_power_on_hand_computed_cases():
    # every pair discordant, no drop: the test's size, P(all 6 one way) = 2 / 2^6
    assert mcnemar_power(6, 0.0, 1.0) == pytest.approx(1 / 32)
    # losses with probability 3/4: reject when all 6 are losses or all gains
    assert mcnemar_power(6, 0.5, 1.0) == pytest.approx(0.75**6 + 0.25**6)
    # 5 pairs can never reach p <= 0.05 (0/5 gives 0.0625)
    assert mcnemar_power(5, 1.0, 1.0) == 0.0


@pytest.mark.parametrize("n, drop, discordance", [(12, 0.2, 0.5), (30, 0.1, 0.3)])
def test_mcnemar_power_matches_enumerating_outcomes(n, drop, discordance):
    lost_p, gained_p = (discordance + drop) / 2, (discordance - drop) / 2
    expected = sum(
        math.factorial(n) / (math.factorial(b) * math.factorial(c) * math.factorial(n - b - c))
        * lost_p**b * gained_p**c * (1 - discordance) ** (n - b - c)
        for b in range(n + 1) for c in range(n + 1 - b) if mcnemar_p(b, c) <= 0.05
    )
    assert mcnemar_power(n, drop, discordance) == pytest.approx(expected, rel=1e-9)


def test_samples_needed_paired_is_the_smallest_n_with_80_percent_power():
    n = samples_needed_paired(0.1, 0.2)
    assert mcnemar_power(n, 0.1, 0.2) >= 0.8
    assert all(mcnemar_power(m, 0.1, 0.2) < 0.8 for m in range(n - 20, n))
    # the normal approximation's 155 falls short under the exact test
    assert n > 155 and mcnemar_power(155, 0.1, 0.2) < 0.78
    assert detectable_drop_paired(n, 0.2) <= 0.1
    assert detectable_drop_paired(n - 30, 0.2) > 0.1


def test_unpaired_sample_size_on_a_hand_computed_case():
    # (1.96 sqrt(2 * 0.75 * 0.25) + 0.8416 sqrt(0.8 * 0.2 + 0.7 * 0.3))^2 / 0.1^2 = 293.2
    assert samples_needed_unpaired(0.1, 0.8) == 294
    assert 0.099 < detectable_drop_unpaired(294, 0.8) <= 0.1


def test_detectable_effect_and_undetectable_cases():
    assert detectable_effect(100, 0.5) == pytest.approx((1.959964 + 0.841621) * 0.05, rel=1e-6)
    # 5 samples with 20% discordance: at most one discordant pair expected, no drop is detectable
    assert math.isnan(detectable_drop_paired(5, 0.2))
    with pytest.raises(ConfigError, match="discordance"):
        samples_needed_paired(0.3, 0.2)
    with pytest.raises(ConfigError):
        samples_needed_unpaired(0.05, 0.0)


def test_sample_size_table_lists_the_functions_values():
    table = sample_size_table(drops=(0.05, 0.15))
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert rows["paired, 10% of samples discordant"].endswith(f"| {samples_needed_paired(0.05, 0.1)} | - |")
    unpaired = rows["unpaired, full cache at 80%"]
    assert unpaired.endswith(f"| {samples_needed_unpaired(0.05, 0.8)} | {samples_needed_unpaired(0.15, 0.8)} |")


# --- frontier and curve


def test_pareto_frontier_on_hand_placed_points():
    scores = [0.9, 0.8, 0.85, 0.5, 0.9, 0.95, 0.7, 0.85]
    bytes_held = [100, 50, 60, 10, 120, 200, 50, 60]
    # 120 B at 0.9 loses to 100 B at 0.9; 50 B at 0.7 to 50 B at 0.8; the two (60 B, 0.85) tie
    assert pareto_frontier(scores, bytes_held) == [3, 1, 2, 7, 0, 5]
    with pytest.raises(ConfigError):
        pareto_frontier([0.5], [1, 2])


def test_retention_auc_on_hand_computed_curves():
    # log2 ratios 0 1 2 3; trapezoids 1, 0.75, 0.5 over a range of 3
    assert retention_auc([1, 2, 4, 8], [1.0, 1.0, 0.5, 0.5]) == pytest.approx(0.75)
    assert retention_auc([8, 1, 4, 2], [0.5, 1.0, 0.5, 1.0]) == pytest.approx(0.75)
    assert retention_auc([2, 32], [0.5, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        retention_auc([2, 2], [1.0, 0.5])
    with pytest.raises(ConfigError):
        retention_auc([2], [1.0])


def test_retention_interval_on_hand_enumerable_resamples():
    # the reference always means 1; the run's resampled mean is 0, 0.5 or 1 (1/4, 1/2, 1/4): the 2.5% and
    # 97.5% quantiles fall on 0 and 100
    interval = retention_ci([([1.0, 1.0], [1.0, 0.0])])
    assert (interval.estimate, interval.low, interval.high, interval.n) == (50.0, 0.0, 100.0, 2)
    assert interval.method == "paired percentile bootstrap of the retention ratio"
    # tasks are averaged: 100% and 0% give 50% in every resample
    assert retention_ci([([1.0, 1.0], [1.0, 1.0]), ([1.0, 1.0], [0.0, 0.0])]).columns(1) == {
        "ci_low": 50.0, "ci_high": 50.0}
    assert retention_ci([([1.0, 0.5, 0.2], [0.3, 0.9, 0.1])]) == retention_ci([([1.0, 0.5, 0.2], [0.3, 0.9, 0.1])])


def test_retention_interval_keeps_the_pairing_and_skips_undefined_resamples():
    # the run scores what the reference scores on every sample: 100% in every resample, although the
    # scores vary; resamples that draw only the reference's 0 (no retention) are left out
    scores = [1.0, 0.0, 0.6, 0.0]
    interval = retention_ci([(scores, scores)])
    assert (interval.estimate, interval.low, interval.high) == (100.0, 100.0, 100.0)
    with pytest.raises(ConfigError, match="mean score is 0"):
        retention_ci([([0.0, 0.0], [1.0, 0.0])])
    with pytest.raises(ConfigError, match="reference's 2 samples"):
        retention_ci([([1.0, 0.0], [1.0, 0.0, 1.0])])


def test_retention_auc_interval_on_a_hand_computed_curve():
    # per sample: (1x = the reference itself, 2x, 4x); retention 100, 50, 0 -> AUC over log2 0..2 = 50;
    # resampled 2x retention is 0, 50 or 100, 4x always 0: AUC 25 + r2 / 2, so 25, 50 or 75
    reference = [1.0, 1.0]
    interval = retention_auc_ci([1, 2, 4], [(reference, [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])])
    assert interval.estimate == pytest.approx(retention_auc([1, 2, 4], [100, 50, 0])) == pytest.approx(50.0)
    assert (interval.low, interval.high) == (25.0, 75.0)
    with pytest.raises(ConfigError, match="one column of scores per ratio"):
        retention_auc_ci([1, 2, 4], [(reference, [[1.0, 1.0], [1.0, 0.0]])])
    with pytest.raises(ConfigError, match="distinct positive"):
        retention_auc_ci([2, 2], [(reference, [[1.0, 1.0], [1.0, 0.0]])])


def test_mean_over_tasks_resamples_each_task_apart():
    # task 1's resampled mean is 0, 0.5 or 1 (1/4, 1/2, 1/4), task 2's always 1: the average is 0.5, 0.75 or 1
    interval = task_mean_ci([[1.0, 0.0], [1.0, 1.0]])
    assert (interval.estimate, interval.low, interval.high, interval.n) == (0.75, 0.5, 1.0, 4)
    # tasks weigh equally: a large task does not swamp a small one
    assert task_mean_ci([[1.0] * 50, [0.0]]).estimate == 0.5
    # one task: the plain bootstrap (the same draws)
    scores = [0.2, 0.9, 0.4, 1.0, 0.0]
    one = task_mean_ci([scores])
    assert (one.low, one.high) == (bootstrap_ci(scores).low, bootstrap_ci(scores).high)
    # one task of 0/1 scores: the task's own interval, Wilson's
    assert task_mean_ci([[1.0] * 12]) == wilson_ci(12, 12)
    with pytest.raises(ConfigError):
        task_mean_ci([])


def test_mean_over_tasks_and_retention_resample_clusters():
    # task 1: two contexts of two questions, all alike within a context; task 2 always 1. A resample of
    # task 1 draws contexts: its mean is 0, 0.5 or 1 (1/4, 1/2, 1/4), as for two independent samples
    task_1, keys = [1.0, 1.0, 0.0, 0.0], ["a", "a", "b", "b"]
    interval = task_mean_ci([task_1, [1.0, 1.0]], [keys, None])
    assert (interval.estimate, interval.low, interval.high) == (0.75, 0.5, 1.0)
    assert interval.method == "clustered stratified percentile bootstrap (tasks)"
    # at level 0.8 the clustered 10% quantile is still 0.5 (probability 1/4); four independent samples
    # give task 1 the means 0, 1/4, 1/2... (1/16, 4/16, 6/16...): the average's is 0.625
    assert task_mean_ci([task_1, [1.0, 1.0]], [keys, None], level=0.8).low == 0.5
    assert task_mean_ci([task_1, [1.0, 1.0]], level=0.8).low == 0.625
    # retention of a run equal to the reference on each context: 100 in every resample
    retention = retention_ci([([1.0, 1.0, 0.5, 0.5], [1.0, 1.0, 0.5, 0.5])], [keys])
    assert (retention.low, retention.high) == (100.0, 100.0) and retention.method.startswith("clustered ")
    # a run that keeps context a and loses b: retention 100 (a only), 0 (b only) or 1 / 1.5 (both)
    lost = retention_ci([([1.0, 1.0, 0.5, 0.5], [1.0, 1.0, 0.0, 0.0])], [keys], level=0.4)
    assert lost.estimate == pytest.approx(100 / 1.5) and lost.low == lost.high == pytest.approx(100 / 1.5)
    with pytest.raises(ConfigError, match="one entry"):
        task_mean_ci([task_1], [keys, keys])
