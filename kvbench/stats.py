"""Statistics for kvbench scores: intervals, paired tests, multiple comparisons, power, Pareto and AUC.

Everything here is pure: it takes per-sample scores (0..1, as ``samples.jsonl`` stores them) and
returns numbers on the same scale; ``columns(scale=100)`` converts to the 0-100 scale of the tables.
Resampling is seeded (``SEED``), so the same scores always give the same interval and p-value.
``docs/statistics.md`` explains the choices; ``python -m kvbench.stats`` prints its sample-size tables
and the coverage table behind :func:`mean_ci`.

- :func:`mean_ci`: the interval kvbench reports for a mean of per-sample scores: :func:`wilson_ci` for
  0/1 scores of independent samples, else :func:`bootstrap_ci`, the percentile bootstrap, plain or
  clustered (the choice measured by :func:`coverage_table`); :func:`task_mean_ci`: of a mean over
  tasks (each task resampled apart).
- :func:`paired_comparison`: one run against a reference, sample by sample (mean difference with a
  paired-bootstrap CI, McNemar or sign-flip p-value, samples lost and gained).
- :func:`mcnemar_p`, :func:`sign_flip_p`, :func:`holm`: the tests and the family-wise correction;
  :func:`indistinguishable_from_best`: the runs a table may mark as best.
- :func:`samples_needed_paired`, :func:`detectable_drop_paired`, :func:`samples_needed_unpaired`,
  :func:`detectable_drop_unpaired`, :func:`mcnemar_power`, :func:`detectable_effect`: power (80%)
  at alpha 0.05.
- :func:`coverage`, :func:`coverage_table`: the exact coverage of a 0/1 mean's interval.
- :func:`pareto_frontier`, :func:`retention_auc`: the score-vs-bytes frontier and the retention curve;
  :func:`retention_ci`, :func:`retention_auc_ci`: their intervals (paired bootstrap of the ratio to
  the reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from kvbench.errors import ConfigError

#: bootstrap resamples for every interval (the percentile tails need thousands to be stable)
RESAMPLES = 10_000
#: Monte Carlo sign-flip draws when exact enumeration (2**m sign patterns) would need more
SIGN_FLIP_DRAWS = 100_000
SEED = 0
LEVEL = 0.95
ALPHA = 0.05
POWER = 0.80
#: resampled indices held in memory at once (bounds memory for large runs; results do not depend on it)
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Interval:
    """A confidence interval of a mean score, with what is needed to reproduce it."""

    estimate: float
    low: float
    high: float
    n: int
    #: "Wilson score", "percentile bootstrap" or "clustered percentile bootstrap"
    method: str
    #: None for an interval that does not resample (Wilson's)
    resamples: int | None
    seed: int | None
    level: float = LEVEL

    def columns(self, scale: float = 100.0) -> dict[str, float]:
        """``ci_low`` and ``ci_high`` on the tables' scale (per-sample scores x ``scale``)."""
        return {"ci_low": scale * self.low, "ci_high": scale * self.high}


@dataclass(frozen=True)
class PairedComparison:
    """A run compared with a reference run on the samples both hold (matched by sample id).

    ``diff`` is mean(run - reference), so a drop from the full cache is negative.
    """

    n: int
    diff: float
    ci_low: float
    ci_high: float
    p: float
    #: "McNemar exact", "sign-flip exact" or "sign-flip Monte Carlo (N draws)"
    test: str
    #: samples scoring lower than under the reference / higher
    lost: int
    gained: int
    #: how ci_low/ci_high were computed (the Interval of the per-sample differences)
    ci_method: str
    resamples: int
    seed: int

    def columns(self, scale: float = 100.0) -> dict[str, float | int]:
        """The results-table columns against the full cache; differences on the tables' scale."""
        return {
            "vs_full_diff": scale * self.diff,
            "vs_full_ci_low": scale * self.ci_low,
            "vs_full_ci_high": scale * self.ci_high,
            "vs_full_p": self.p,
            "lost": self.lost,
            "gained": self.gained,
        }


def _scores_array(scores: Sequence[float], what: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ConfigError(f"{what}: expected a non-empty list of per-sample scores, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ConfigError(f"{what}: scores must be finite numbers (found NaN or infinity)")
    return values


def _cluster_sums(values: np.ndarray, clusters: Sequence[Hashable] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster (sums, size) of ``values`` (samples, or samples x columns: sums per column);
    without clusters every sample is its own cluster."""
    if clusters is None:
        return values, np.ones(len(values))
    if len(clusters) != len(values):
        raise ConfigError(f"clusters: expected one key per sample ({len(values)}), got {len(clusters)}")
    index: dict[Hashable, int] = {}
    ids = np.array([index.setdefault(key, len(index)) for key in clusters])
    columns = values.reshape(len(values), -1).T
    sums = np.column_stack([np.bincount(ids, weights=c, minlength=len(index)) for c in columns])
    sizes = np.bincount(ids, minlength=len(index)).astype(np.float64)
    return sums.reshape(len(index), *values.shape[1:]), sizes


def bootstrap_ci(
    scores: Sequence[float],
    clusters: Sequence[Hashable] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """Percentile bootstrap CI of the mean of ``scores``.

    Each resample draws as many units as there are, with replacement, and takes the mean score of
    the samples drawn; the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of
    those means. With ``clusters`` (one key per sample, e.g. the context several questions share)
    the units are clusters: a resample draws whole clusters and the statistic is the mean over all
    their samples, so correlation within a cluster widens the interval as it should.
    """
    values = _scores_array(scores, "bootstrap_ci")
    if resamples < 1 or not 0 < level < 1:
        raise ConfigError(f"bootstrap_ci: resamples must be >= 1 and 0 < level < 1 (got {resamples}, {level})")
    sums, sizes = _cluster_sums(values, clusters)
    units = len(sums)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    rows = max(1, _CHUNK_ELEMENTS // units)
    equal_sizes = bool(np.all(sizes == sizes[0]))
    for start in range(0, resamples, rows):
        draw = rng.integers(0, units, size=(min(rows, resamples - start), units), dtype=np.int32)
        # equal cluster sizes: the denominator is the same for every resample
        total = units * sizes[0] if equal_sizes else sizes[draw].sum(axis=1)
        means[start : start + len(draw)] = sums[draw].sum(axis=1) / total
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    clustered = clusters is not None and units < len(values)
    return Interval(
        estimate=float(values.mean()),
        low=float(low),
        high=float(high),
        n=len(values),
        method="clustered percentile bootstrap" if clustered else "percentile bootstrap",
        resamples=resamples,
        seed=seed,
        level=level,
    )


WILSON = "Wilson score"


def wilson_ci(successes: int, n: int, *, level: float = LEVEL) -> Interval:
    """Wilson score interval of a proportion: ``successes`` of ``n`` independent 0/1 samples.

    The values of p whose score test ``|k/n - p| <= z sqrt(p (1 - p) / n)`` accepts, that is
    ``(k + z^2/2) / (n + z^2) -+ z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4)`` with z the normal
    quantile of ``(1 + level) / 2``. Unlike the percentile bootstrap it does not collapse when no
    sample (or every sample) fails: 20 of 20 gives [83.9%, 100%].
    """
    if not 0 <= successes <= n or n < 1 or not 0 < level < 1:
        raise ConfigError(f"wilson_ci: need 0 <= successes <= n, n >= 1 and 0 < level < 1 "
                          f"(got {successes}, {n}, {level})")
    z = NormalDist().inv_cdf((1 + level) / 2)
    centre = (successes + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(successes * (n - successes) / n + z * z / 4)
    # the ends are exactly 0 and 1 with no success or no failure; the formula leaves rounding there
    low = 0.0 if successes == 0 else centre - half
    high = 1.0 if successes == n else centre + half
    return Interval(estimate=successes / n, low=low, high=high, n=n, method=WILSON, resamples=None, seed=None,
                    level=level)


def mean_ci(
    scores: Sequence[float],
    clusters: Sequence[Hashable] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """The interval kvbench reports for the mean of per-sample ``scores``: the Wilson score interval
    (:func:`wilson_ci`) when every score is 0 or 1 and no two samples share a cluster; otherwise the
    percentile bootstrap (:func:`bootstrap_ci`), clustered when ``clusters`` groups samples.

    The percentile bootstrap covers a 0/1 mean near 0 or 1 badly at small n (all n samples right:
    every resample is right, and the interval is [1, 1]); Wilson's covers it at about the nominal
    rate. :func:`coverage_table` measures both; ``docs/statistics.md`` keeps its numbers.
    """
    values = _scores_array(scores, "mean_ci")
    sums, _ = _cluster_sums(values, clusters)  # checks one key per sample
    shared = len(sums) < len(values)
    if not shared and np.all((values == 0) | (values == 1)):
        return wilson_ci(int(values.sum()), len(values), level=level)
    return bootstrap_ci(values, clusters if shared else None, resamples=resamples, seed=seed, level=level)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs ``b`` and ``c``.

    ``p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])``, computed in exact integers.
    """
    if b < 0 or c < 0:
        raise ConfigError(f"mcnemar_p: discordant counts must be >= 0 (got b={b}, c={c})")
    m = b + c
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**m)


def sign_flip_p(
    differences: Sequence[float],
    clusters: Sequence[Hashable] | None = None,
    *,
    draws: int = SIGN_FLIP_DRAWS,
    seed: int = SEED,
) -> tuple[float, str]:
    """Two-sided paired permutation (sign-flip) p-value of mean(differences) = 0, and its name.

    Under the null hypothesis each paired difference is as likely to have either sign, so the
    statistic is compared with ``|sum(s_i * d_i)|`` over random signs ``s_i``. With ``clusters``
    the signs flip whole clusters' summed differences (samples of one context are not independent).
    Zero differences do not change the statistic and are left out. When the ``m`` non-zero units
    have ``2**m <= draws`` sign patterns all are enumerated (exact p); otherwise ``draws`` seeded
    random patterns give ``(1 + hits) / (draws + 1)``, a valid p-value whose Monte Carlo standard
    error at p = 0.05 is about 0.0007 for the default 100,000 draws.
    """
    values = _scores_array(differences, "sign_flip_p")
    if draws < 1:
        raise ConfigError(f"sign_flip_p: draws must be >= 1 (got {draws})")
    sums, _ = _cluster_sums(values, clusters)
    units = sums[sums != 0]
    m = len(units)
    observed = abs(units.sum())
    # sums in another order differ in the last bits: a pattern as extreme up to rounding counts
    tolerance = 1e-9 * float(np.abs(units).sum())
    if 2**m <= draws:
        signs = ((np.arange(2**m)[:, None] >> np.arange(m)) & 1) * 2.0 - 1.0
        hits = int(np.count_nonzero(np.abs(signs @ units) >= observed - tolerance))
        return hits / 2**m, "sign-flip exact"
    rng = np.random.default_rng(seed)
    hits = 0
    rows = max(1, _CHUNK_ELEMENTS // m)
    for start in range(0, draws, rows):
        signs = rng.integers(0, 2, size=(min(rows, draws - start), m)) * 2.0 - 1.0
        hits += int(np.count_nonzero(np.abs(signs @ units) >= observed - tolerance))
    return (1 + hits) / (draws + 1), f"sign-flip Monte Carlo ({draws} draws)"


def paired_comparison(
    reference: Mapping[str, float],
    run: Mapping[str, float],
    clusters: Mapping[str, Hashable] | None = None,
    *,
    resamples: int = RESAMPLES,
    draws: int = SIGN_FLIP_DRAWS,
    seed: int = SEED,
) -> PairedComparison:
    """Compare ``run`` with ``reference`` (sample id -> per-sample score) on the ids both hold.

    Ids held by only one run are left out (``n`` says how many pairs remain). The mean difference
    ``run - reference`` gets a paired percentile bootstrap CI (over clusters of ids when ``clusters``
    maps ids to cluster keys). The p-value: when every score is 0 or 1 and no cluster holds two
    compared samples, the exact McNemar test on the discordant pairs; otherwise the sign-flip
    permutation test (:func:`sign_flip_p`), clustered like the CI. On 0/1 scores the sign-flip
    test is the binomial test of the discordant pairs, so McNemar is that test computed exactly.
    """
    ids = [i for i in reference if i in run]
    if not ids:
        raise ConfigError("paired_comparison: the two runs share no sample id")
    ref = _scores_array([reference[i] for i in ids], "paired_comparison reference")
    new = _scores_array([run[i] for i in ids], "paired_comparison run")
    keys = None
    if clusters is not None:
        missing = [i for i in ids if i not in clusters]
        if missing:
            raise ConfigError(f"paired_comparison: no cluster key for sample ids {missing[:5]}")
        keys = [clusters[i] for i in ids]
    differences = new - ref
    interval = bootstrap_ci(differences, keys, resamples=resamples, seed=seed)
    binary = bool(np.all((ref == 0) | (ref == 1)) and np.all((new == 0) | (new == 1)))
    singletons = keys is None or len(set(keys)) == len(keys)
    lost, gained = int(np.count_nonzero(differences < 0)), int(np.count_nonzero(differences > 0))
    if binary and singletons:
        p, test = mcnemar_p(lost, gained), "McNemar exact"
    else:
        p, test = sign_flip_p(differences, keys, draws=draws, seed=seed)
    return PairedComparison(
        n=len(ids),
        diff=interval.estimate,
        ci_low=interval.low,
        ci_high=interval.high,
        p=p,
        test=test,
        lost=lost,
        gained=gained,
        ci_method=interval.method,
        resamples=resamples,
        seed=seed,
    )


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: reject a hypothesis when its value is <= alpha.

    The i-th smallest p (1-based) is multiplied by ``m - i + 1``, capped at 1, and made
    non-decreasing in that order; this controls the family-wise error rate for any dependence.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise ConfigError(f"holm: expected a list of p-values in [0, 1], got {list(pvalues)}")
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return adjusted.tolist()


def indistinguishable_from_best(
    runs: Mapping[str, Mapping[str, float]],
    clusters: Mapping[str, Hashable] | None = None,
    *,
    alpha: float = ALPHA,
) -> list[str]:
    """The runs a table marks as best: ``runs`` maps a name to its per-sample scores (sample id ->
    score). The best is the highest mean score (the first in ``runs`` on a tie). Every other run is
    compared with it by :func:`paired_comparison`, and the p-values are Holm-adjusted as one family.
    The result is the best and every run it does not beat at ``alpha``, in ``runs``' order: only the
    best when it beats the runner-up (and so every run) significantly."""
    if not runs:
        raise ConfigError("indistinguishable_from_best: no runs to compare")
    means = {name: float(_scores_array(list(scores.values()), name).mean()) for name, scores in runs.items()}
    best = max(means, key=means.__getitem__)
    others = [name for name in runs if name != best]
    adjusted = holm([paired_comparison(runs[best], runs[name], clusters).p for name in others])
    tied = {name for name, p in zip(others, adjusted) if p > alpha}
    return [name for name in runs if name == best or name in tied]


def _check_alpha_power(alpha: float, power: float) -> None:
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ConfigError(f"alpha and power must lie in (0, 1) (got {alpha}, {power})")


def _z_quantiles(alpha: float, power: float) -> tuple[float, float]:
    """The normal quantiles z_(1 - alpha/2) (two-sided test) and z_power."""
    _check_alpha_power(alpha, power)
    normal = NormalDist()
    return normal.inv_cdf(1 - alpha / 2), normal.inv_cdf(power)


def detectable_effect(n: int, sd: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest mean difference a two-sided test at ``alpha`` detects with ``power`` from ``n``
    samples whose per-sample difference has standard deviation ``sd`` (normal approximation):
    ``(z_(1-alpha/2) + z_power) * sd / sqrt(n)``. For a paired comparison ``sd`` is that of the
    per-sample differences; for continuous metrics it can be estimated from a pilot run."""
    if n < 1 or sd < 0:
        raise ConfigError(f"detectable_effect: need n >= 1 and sd >= 0 (got n={n}, sd={sd})")
    z_alpha, z_power = _z_quantiles(alpha, power)
    return (z_alpha + z_power) * sd / math.sqrt(n)


def _paired_n(drop: float, discordance: float, alpha: float, power: float) -> float:
    # McNemar's normal approximation (Connor 1987): the per-sample difference has variance
    # discordance under the null and discordance - drop^2 under the alternative
    z_alpha, z_power = _z_quantiles(alpha, power)
    return (z_alpha * math.sqrt(discordance) + z_power * math.sqrt(discordance - drop**2)) ** 2 / drop**2


def _unpaired_n(drop: float, score: float, alpha: float, power: float) -> float:
    # two independent proportions score and score - drop (Fleiss, without continuity correction)
    z_alpha, z_power = _z_quantiles(alpha, power)
    other = score - drop
    pooled = (score + other) / 2
    spread = z_alpha * math.sqrt(2 * pooled * (1 - pooled)) + z_power * math.sqrt(
        score * (1 - score) + other * (1 - other)
    )
    return spread**2 / drop**2


def _binomial_pmf(m: np.ndarray, k: np.ndarray, q: float) -> np.ndarray:
    """P[Binomial(m, q) = k], broadcast over ``m`` and ``k`` (0 where k > m)."""
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, int(np.max(m)) + 1)))])
    inside = k <= m
    kk, rest = np.where(inside, k, 0), np.where(inside, m - k, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # 0 * log(0) is 0 here (q = 0 or 1 gives a certain count)
        log_q = np.where(kk > 0, kk * np.log(q), 0.0) + np.where(rest > 0, rest * np.log1p(-q), 0.0)
    log_pmf = log_factorial[kk + rest] - log_factorial[kk] - log_factorial[rest] + log_q
    return np.where(inside, np.exp(log_pmf), 0.0)


def _mcnemar_rejection(m_max: int, lost_share: float, alpha: float) -> np.ndarray:
    """For m = 0..m_max discordant pairs, P[mcnemar_p(lost, gained) <= alpha] when each
    discordant pair is a loss with probability ``lost_share``."""
    m = np.arange(m_max + 1)[:, None]
    k = np.arange(m_max // 2 + 1)[None, :]
    # the test rejects when min(lost, gained) <= the largest k with 2 P[Bin(m, 1/2) <= k] <= alpha
    critical = np.count_nonzero(2 * np.cumsum(_binomial_pmf(m, k, 0.5), axis=1) <= alpha, axis=1) - 1
    either_tail = _binomial_pmf(m, k, lost_share) + _binomial_pmf(m, k, 1 - lost_share)
    return np.where(k <= critical[:, None], either_tail, 0.0).sum(axis=1)


def mcnemar_power(n: int, drop: float, discordance: float, *, alpha: float = ALPHA) -> float:
    """Exact power of the exact McNemar test (:func:`mcnemar_p` <= ``alpha``) on ``n`` pairs when
    each pair is discordant with probability ``discordance`` and the expected share of losses minus
    gains is ``drop``: the discordant count is Binomial(n, discordance) and each discordant pair is
    a loss with probability (discordance + drop) / (2 discordance)."""
    _check_paired(drop, discordance, zero_drop=True)
    if not 0 < alpha < 1:
        raise ConfigError(f"mcnemar_power: alpha must lie in (0, 1) (got {alpha})")
    if n < 1:
        raise ConfigError(f"mcnemar_power: need n >= 1 pairs (got {n})")
    reject = _mcnemar_rejection(n, (discordance + drop) / (2 * discordance), alpha)
    return float(_binomial_pmf(np.array(n), np.arange(n + 1), discordance) @ reject)


def _check_paired(drop: float, discordance: float, *, zero_drop: bool = False) -> None:
    drop_ok = drop >= 0 if zero_drop else drop > 0
    if not (0 < discordance <= 1 and drop_ok and drop <= discordance):
        raise ConfigError(
            f"paired 0/1 power: need 0 < discordance <= 1 and 0 {'<=' if zero_drop else '<'} drop <= "
            f"discordance (a drop is at most the share of discordant samples); got drop={drop}, "
            f"discordance={discordance}"
        )


def _check_unpaired(drop: float, score: float) -> None:
    if not 0 < score <= 1 or not 0 < drop <= score:
        raise ConfigError(f"unpaired 0/1 power: need 0 < drop <= score <= 1; got drop={drop}, score={score}")


def samples_needed_paired(
    drop: float, discordance: float, *, alpha: float = ALPHA, power: float = POWER
) -> int:
    """Samples a paired 0/1 comparison needs to detect ``drop`` (a fraction, 0.05 = 5 points) when
    a share ``discordance`` of samples changes outcome between the two runs ((lost + gained) / n):
    the smallest n at which the exact McNemar test reaches ``power`` (:func:`mcnemar_power`).

    The normal approximation (Connor 1987) asks for up to 8% fewer samples, at which the exact
    test, being conservative, has 76-79% power instead.
    """
    _check_paired(drop, discordance)
    lost_share = (discordance + drop) / (2 * discordance)
    # the exact test needs somewhat more than the normal approximation; search up to twice that
    n_max = 2 * math.ceil(_paired_n(drop, discordance, alpha, power))
    while True:
        reject = _mcnemar_rejection(n_max, lost_share, alpha)
        for n in range(1, n_max + 1):
            if _binomial_pmf(np.array(n), np.arange(n + 1), discordance) @ reject[: n + 1] >= power:
                return n
        n_max *= 2


def samples_needed_unpaired(drop: float, score: float, *, alpha: float = ALPHA, power: float = POWER) -> int:
    """Samples per run to detect a fall from accuracy ``score`` to ``score - drop`` between two
    independent sets of 0/1 samples with a two-sided two-proportion z-test (normal approximation).
    Ignoring the pairing makes it an upper bound for kvbench's runs, which share their samples."""
    _check_unpaired(drop, score)
    return math.ceil(_unpaired_n(drop, score, alpha, power))


def _smallest_effect(detects: Callable[[float], bool], largest: float) -> float:
    """The smallest effect in (0, largest] that ``detects`` (false below it, true above), by
    bisection; NaN when not even ``largest`` is detected."""
    if not detects(largest):
        return math.nan
    low, high = 0.0, largest
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if detects(middle) else (middle, high)
    return high


def detectable_drop_paired(
    n: int, discordance: float, *, alpha: float = ALPHA, power: float = POWER
) -> float:
    """Smallest drop (fraction) that ``n`` paired 0/1 samples with a share ``discordance`` of
    discordant pairs detect with ``power`` under the exact McNemar test; NaN when no drop up to
    ``discordance`` is."""
    _check_paired(discordance, discordance)
    _check_alpha_power(alpha, power)
    return _smallest_effect(lambda d: mcnemar_power(n, d, discordance, alpha=alpha) >= power, discordance)


def detectable_drop_unpaired(n: int, score: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest fall from accuracy ``score`` detectable with ``n`` independent samples per run (the
    inverse of :func:`samples_needed_unpaired`); NaN when no fall down to 0 is."""
    _check_unpaired(score, score)
    if n < 1:
        raise ConfigError(f"detectable_drop_unpaired: need n >= 1 samples (got {n})")
    return _smallest_effect(lambda d: _unpaired_n(d, score, alpha, power) <= n, score)


def pareto_frontier(scores: Sequence[float], bytes_held: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (a higher or equal score with fewer or equal
    bytes held, better in at least one), ordered by bytes held, fewest first. Identical points are
    all kept."""
    if len(scores) != len(bytes_held):
        raise ConfigError(f"pareto_frontier: {len(scores)} scores but {len(bytes_held)} byte counts")
    # by bytes ascending, the better score first among equal bytes: a point is on the frontier when
    # it scores above everything cheaper (or equals the point just kept, with the same bytes)
    order = sorted(range(len(scores)), key=lambda i: (bytes_held[i], -scores[i]))
    frontier: list[int] = []
    for i in order:
        last = frontier[-1] if frontier else None
        if last is None or scores[i] > scores[last] or (
            scores[i] == scores[last] and bytes_held[i] == bytes_held[last]
        ):
            frontier.append(i)
    return frontier


def _log2_ratios(ratios: Sequence[float], count: int, what: str) -> np.ndarray:
    if count != len(ratios) or len(ratios) < 2:
        raise ConfigError(f"{what}: need >= 2 (ratio, retention) points of equal count, got "
                          f"{len(ratios)} ratios and {count} values")
    x = np.log2(np.asarray(ratios, dtype=np.float64))
    if np.any(~np.isfinite(x)) or len(set(x.tolist())) != len(x):
        raise ConfigError(f"{what}: ratios must be distinct positive numbers, got {list(ratios)}")
    return x


def _mean_height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Trapezoid area under ``y`` (last axis, one value per ``x``) over ``x``, divided by x's range."""
    order = np.argsort(x)
    x, y = x[order], y[..., order]
    area = np.sum((x[1:] - x[:-1]) * (y[..., 1:] + y[..., :-1]) / 2, axis=-1)
    return area / float(x[-1] - x[0])


def retention_auc(ratios: Sequence[float], retention: Sequence[float]) -> float:
    """Area under the retention-vs-ratio curve over log2(ratio), divided by the swept log2 range.

    The curve is linear between measured points (trapezoids) in log2(ratio), since ratios are swept
    geometrically (2, 4, 8...). The result is the curve's mean height: 1.0 when every ratio keeps
    the full cache's score, 0.5 for a method that keeps half of it throughout. Comparable only
    between methods swept over the same ratios.
    """
    x = _log2_ratios(ratios, len(retention), "retention_auc")
    return float(_mean_height(x, np.asarray(retention, dtype=np.float64)))


def _resampled_means(table: np.ndarray, rng: np.random.Generator, resamples: int,
                     clusters: Sequence[Hashable] | None = None) -> np.ndarray:
    """(resamples, columns): the column means of ``table`` (samples x columns) over ``resamples``
    draws of its rows with replacement, each draw shared by all columns (the pairing); with
    ``clusters`` (a key per row), draws of whole clusters, as :func:`bootstrap_ci` draws them."""
    sums, sizes = _cluster_sums(table, clusters)
    units = len(sums)
    means = np.empty((resamples, table.shape[1]))
    rows = max(1, _CHUNK_ELEMENTS // units)
    for start in range(0, resamples, rows):
        draw = rng.integers(0, units, size=(min(rows, resamples - start), units), dtype=np.int32)
        means[start : start + len(draw)] = (table[draw].mean(axis=1) if clusters is None
                                            else sums[draw].sum(axis=1) / sizes[draw].sum(axis=1)[:, None])
    return means


def _task_clusters(clusters: Sequence[Sequence[Hashable] | None] | None, count: int) -> tuple[list, str]:
    """Each task's cluster keys (None: unclustered), and "clustered " when some task shares one."""
    if clusters is None:
        return [None] * count, ""
    if len(clusters) != count:
        raise ConfigError(f"clusters: expected one entry (keys or None) per task ({count}), got {len(clusters)}")
    shared = any(keys is not None and len(set(keys)) < len(keys) for keys in clusters)
    return list(clusters), "clustered " if shared else ""


def task_mean_ci(
    tasks: Sequence[Sequence[float]],
    clusters: Sequence[Sequence[Hashable] | None] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """CI of the mean over tasks of each task's mean score (an average over a leaderboard's tasks,
    each task weighted equally whatever its size). One task: its own interval (:func:`mean_ci`).
    Several: a stratified percentile bootstrap, in which each resample draws every task's samples
    (with ``clusters``, per task a key per sample or None: its clusters) with replacement,
    independently per task."""
    if not tasks:
        raise ConfigError("task_mean_ci: no tasks given")
    keys, clustered = _task_clusters(clusters, len(tasks))
    if len(tasks) == 1:
        return mean_ci(tasks[0], keys[0], resamples=resamples, seed=seed, level=level)
    rng = np.random.default_rng(seed)
    arrays = [_scores_array(scores, "task_mean_ci") for scores in tasks]
    resampled = sum(_resampled_means(values[:, None], rng, resamples, k)[:, 0]
                    for values, k in zip(arrays, keys)) / len(arrays)
    estimate = sum(values.mean() for values in arrays) / len(arrays)
    return _percentile_interval(estimate, resampled, sum(map(len, arrays)),
                                f"{clustered}stratified percentile bootstrap (tasks)", resamples, seed, level)


def _resampled_retention(
    tasks: Sequence[tuple[Sequence[float], Sequence[Sequence[float]]]], resamples: int, seed: int,
    clusters: Sequence[Sequence[Hashable] | None],
) -> tuple[np.ndarray, np.ndarray, int]:
    """(estimate (k,), resampled (resamples, k), samples): per column of runs, the mean over tasks of
    100 * mean(run) / mean(reference). Each task's samples (or its ``clusters``) are drawn with
    replacement, the same draw for its reference and all its runs (pairing); tasks are drawn
    independently. A resample whose reference mean is 0 gives NaN."""
    if not tasks:
        raise ConfigError("retention interval: no tasks given")
    rng = np.random.default_rng(seed)
    estimate, resampled, samples = 0.0, 0.0, 0
    for (reference, runs), keys in zip(tasks, clusters):
        ref = _scores_array(reference, "retention reference")
        table = np.asarray(runs, dtype=np.float64)
        if table.ndim != 2 or table.shape[0] != len(ref):
            raise ConfigError(f"retention interval: expected the runs' scores on the reference's {len(ref)} "
                              f"samples, got shape {table.shape}")
        if not np.all(np.isfinite(table)):
            raise ConfigError("retention runs: scores must be finite numbers (found NaN or infinity)")
        if ref.mean() == 0:
            raise ConfigError("retention interval: the reference's mean score is 0, so retention is undefined")
        means = _resampled_means(np.column_stack([ref, table]), rng, resamples, keys)
        ref_means, means = means[:, 0], means[:, 1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            resampled = resampled + 100 * means / np.where(ref_means == 0, np.nan, ref_means)[:, None]
        estimate = estimate + 100 * table.mean(axis=0) / ref.mean()
        samples += len(ref)
    return estimate / len(tasks), resampled / len(tasks), samples


def _percentile_interval(estimate: float, resampled: np.ndarray, n: int, method: str, resamples: int, seed: int,
                         level: float) -> Interval:
    """The interval of ``estimate`` from its resampled values; NaN resamples are left out."""
    finite = resampled[np.isfinite(resampled)]
    tail = (1 - level) / 2
    low, high = np.quantile(finite, [tail, 1 - tail]) if finite.size else (math.nan, math.nan)
    return Interval(estimate=float(estimate), low=float(low), high=float(high), n=n, method=method,
                    resamples=resamples, seed=seed, level=level)


RETENTION_CI_METHOD = "paired percentile bootstrap of the retention ratio"


def retention_ci(
    tasks: Sequence[tuple[Sequence[float], Sequence[float]]],
    clusters: Sequence[Sequence[Hashable] | None] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """95% interval of a retention in percent: the mean over ``tasks`` of 100 * mean(run) /
    mean(reference), where each task is (reference scores, run scores) on the same samples in the
    same order. The bootstrap resamples each task's samples (with ``clusters``, per task a key per
    sample or None: its clusters; the same draw for both runs, so the pairing is kept; tasks
    independently). Resamples in which a reference mean is 0 (retention undefined) are left out;
    with none left the ends are NaN."""
    keys, clustered = _task_clusters(clusters, len(tasks))
    estimate, resampled, n = _resampled_retention(
        [(ref, np.asarray(run, dtype=np.float64)[:, None]) for ref, run in tasks], resamples, seed, keys)
    return _percentile_interval(estimate[0], resampled[:, 0], n, clustered + RETENTION_CI_METHOD, resamples, seed,
                                level)


def retention_auc_ci(
    ratios: Sequence[float],
    tasks: Sequence[tuple[Sequence[float], Sequence[Sequence[float]]]],
    clusters: Sequence[Sequence[Hashable] | None] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """:func:`retention_auc` of a method's retention curve (percent) with its 95% interval. Each
    task is (reference scores (n,), runs' scores (n, len(ratios))): the method's run at each ratio
    on the same samples as the reference. Every bootstrap resample draws each task's samples (or
    its ``clusters``, as in :func:`retention_ci`) once for the reference and all ratios, computes the retention curve averaged over tasks as
    :func:`retention_ci` does, and its AUC. To start the curve at the full cache, give ratio 1 with
    the reference's own scores as its run (retention exactly 100 in every resample)."""
    if any(np.shape(runs)[1:] != (len(ratios),) for _, runs in tasks):
        raise ConfigError(f"retention_auc_ci: every task needs one column of scores per ratio ({len(ratios)})")
    x = _log2_ratios(ratios, len(ratios), "retention_auc_ci")
    keys, clustered = _task_clusters(clusters, len(tasks))
    estimate, resampled, n = _resampled_retention(tasks, resamples, seed, keys)
    return _percentile_interval(_mean_height(x, estimate), _mean_height(x, resampled), n,
                                f"{clustered}{RETENTION_CI_METHOD} curve's area", resamples, seed, level)


DISCORDANCES = (0.10, 0.20, 0.30)
FULL_SCORES = (0.5, 0.8, 0.9)


def _table(head: str, columns: Sequence[str], rows: dict[str, list[str]]) -> str:
    lines = [f"| {head} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows.items()]
    return "\n".join(lines)


def sample_size_table(drops: Sequence[float] = (0.05, 0.10)) -> str:
    """Markdown table: samples a 0/1 task needs to detect each drop at 80% power, alpha 0.05,
    paired (by discordance rate; "-" where the drop exceeds it) and unpaired (by the full cache's
    accuracy)."""
    rows = {
        f"paired, {100 * psi:g}% of samples discordant": [
            str(samples_needed_paired(d, psi)) if d <= psi else "-" for d in drops
        ]
        for psi in DISCORDANCES
    }
    rows |= {
        f"unpaired, full cache at {100 * score:g}%": [str(samples_needed_unpaired(d, score)) for d in drops]
        for score in FULL_SCORES
    }
    return _table("comparison", [f"{100 * d:g}-point drop" for d in drops], rows)


def detectable_drop_table(ns: Sequence[int] = (6, 25, 50, 100, 200, 500)) -> str:
    """Markdown table: the smallest drop (points) detectable at 80% power, alpha 0.05, with n
    samples, paired and unpaired as in :func:`sample_size_table` ("-": none is)."""

    def points(drop: float) -> str:
        return "-" if math.isnan(drop) else f"{100 * drop:.1f}"

    rows = {
        f"paired, {100 * psi:g}% discordant": [points(detectable_drop_paired(n, psi)) for n in ns]
        for psi in DISCORDANCES
    }
    rows |= {
        f"unpaired, full cache at {100 * score:g}%": [points(detectable_drop_unpaired(n, score)) for n in ns]
        for score in FULL_SCORES
    }
    return _table("comparison", [f"n = {n}" for n in ns], rows)


def coverage(interval: Callable[[int, int], Interval], n: int, p: float) -> float:
    """The exact coverage of a 0/1 mean's interval: the probability that ``interval(k, n)``, computed
    from k ~ Binomial(n, p) successes of n samples, contains p (a sum over the n + 1 outcomes, so
    no simulation error)."""
    contains = np.array([(ci := interval(k, n)).low <= p <= ci.high for k in range(n + 1)])
    return float(_binomial_pmf(np.array(n), np.arange(n + 1), p) @ contains)


def bootstrap_of_successes(successes: int, n: int) -> Interval:
    """:func:`bootstrap_ci` of ``successes`` ones and ``n - successes`` zeros (seed 0), as a run of
    that outcome would get it."""
    return bootstrap_ci([1.0] * successes + [0.0] * (n - successes))


COVERAGE_NS = (10, 20, 50, 100, 200)
COVERAGE_PS = (0.5, 0.8, 0.9, 0.95, 0.99)


def coverage_table(ns: Sequence[int] = COVERAGE_NS, ps: Sequence[float] = COVERAGE_PS) -> str:
    """Markdown table: the exact coverage (%) of the nominal 95% intervals of a 0/1 mean, the
    percentile bootstrap against Wilson's, for n samples of true accuracy p (by symmetry, p and
    1 - p have the same coverage). The measurement behind :func:`mean_ci`'s choice."""
    intervals = {"percentile bootstrap": bootstrap_of_successes, WILSON: wilson_ci}
    rows = {f"{name}, n = {n}": [f"{100 * coverage(interval, n, p):.1f}" for p in ps]
            for n in ns for name, interval in intervals.items()}
    return _table("interval", [f"p = {100 * p:g}%" for p in ps], rows)


if __name__ == "__main__":
    print(sample_size_table(), detectable_drop_table(), coverage_table(), sep="\n\n")
