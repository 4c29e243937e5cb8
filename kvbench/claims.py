"""The source papers' claims as data, and the verdicts kvbench's runs give them (docs/reproductions.md).

Each :class:`Claim` quotes a paper, gives the paper's own figure and where it stands, and names the
board cells it reads through its test (:data:`Test`, ``test.cells()``): a cell is (task, method,
setting) on each model, the setting being a results directory name (``ratio-2``, ``budget-128``,
``ratio-2_lag_size-128``). A claim is judged on every model of ``models``, one row each, by
:func:`evaluate`, from the run table of :func:`kvbench.report.collect` (per-sample scores, bytes
held, states) and, for capacities, the records themselves.

Verdicts (:data:`VERDICT_RULES`), decided in this order:

- **not run yet**: a cell the test reads is missing, partial or unscored (named in the row); a capacity
  shows the complete cells' figure meanwhile, and is decided as soon as one record exceeds it;
- **not testable on CPU**: the test cannot say anything on the embedded models (the full cache itself
  scores 0 on the task, or the method cell at a ratio compressed nothing at these prompt lengths:
  measured ratio below :data:`COMPRESSED_NOTHING`), or the claim
  needs models or tasks beyond a CPU (:class:`NotOnCpu`, the reason given). A retention over several
  tasks leaves out (and names) those on which the full cache scores 0, and is untestable only when
  none remains;
- **reproduced in direction**: the 95% interval lies wholly on the claimed side (a difference above 0,
  a retention at or above the claimed floor); for a capacity, no record held more than its capacity;
- **not reproduced**: the interval lies wholly on the other side (a difference at or below 0 — equal
  scores do not show a gain —, a retention below the floor); for a capacity, a record held more;
- **inconclusive at n**: the interval straddles the claimed side's edge at this sample size.

Intervals: :func:`kvbench.stats.paired_comparison` (method - rival, paired by sample id, its
bootstrap interval; the p-value is shown, the verdict uses the interval) and
:func:`kvbench.stats.retention_ci` (retention against the full cache, paired by sample id, mean over
the claim's tasks), both clustered as the report clusters the runs' samples (samples that share a
context resample together). Each claim is judged at its own 95% level: no correction across claims, so about
one in twenty true nulls would read as a direction by chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kvbench.errors import ConfigError
from kvbench.report import _clusters
from kvbench.results import RunDir
from kvbench.stats import paired_comparison, retention_ci

REPRODUCED = "reproduced in direction"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive at n"
NOT_RUN = "not run yet"
NOT_TESTABLE = "not testable on CPU"
#: the verdicts and the rule of each, as docs/reproductions.md states them (the module docstring explains)
VERDICT_RULES = {
    NOT_RUN: "a cell the claim reads is missing, partial or unscored (named in the row); a capacity row shows "
             "its complete cells' figure meanwhile, and one record over the capacity refutes it whatever is still to run",
    NOT_TESTABLE: "the embedded models cannot test it: the full cache scores 0 on the task (a retention over "
                  "several tasks leaves such tasks out, named, and needs one left), the method cell at a ratio "
                  "compressed nothing at these prompt lengths (measured ratio below 1.05x), or the claim needs "
                  "models or tasks beyond a CPU (reason given)",
    REPRODUCED: "the 95% interval lies wholly on the claimed side: method - rival above 0, or retention at or "
                "above the claimed floor; for a capacity, no record held more than the capacity",
    NOT_REPRODUCED: "the 95% interval lies wholly on the other side: method - rival at or below 0 (equal scores "
                    "show no gain), or retention below the floor; for a capacity, some record held more",
    INCONCLUSIVE: "the 95% interval reaches both sides at this n",
}

BASELINE = ("full", "ratio-1")
CPU_MODELS = ("smollm2-135m", "gemma3-270m")
GPU_MODELS = ("llama-3.1-8b-instruct", "qwen2.5-7b-instruct")
RULER_TASKS = tuple(f"ruler/{t}" for t in ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe"))
CPU_TASKS = ("passkey", "passkey64", *RULER_TASKS, "decode_recall")
BUDGET = "budget-128"
#: a cell whose measured ratio is below this compressed (next to) nothing: a claim about compression says nothing
COMPRESSED_NOTHING = 1.05


@dataclass(frozen=True)
class Retention:
    """The method's retention against the full cache at ``setting``, mean over ``tasks``, is at
    least ``floor`` percent."""

    method: str
    setting: str
    tasks: tuple[str, ...]
    floor: float

    def cells(self) -> list[tuple[str, str, str]]:
        return [(task, method, setting) for task in self.tasks
                for method, setting in ((self.method, self.setting), BASELINE)]


@dataclass(frozen=True)
class Beats:
    """``method`` scores above ``rival`` on ``task``, both at ``setting``, paired by sample id.
    ``rival_setting``: the rival's setting name where it differs (the same compression, but the
    method runs with parameters of its own, e.g. ``ratio-2_lag_size-128`` against ``ratio-2``)."""

    method: str
    rival: str
    task: str
    setting: str
    rival_setting: str | None = None

    def cells(self) -> list[tuple[str, str, str]]:
        return [(self.task, self.method, self.setting), (self.task, self.rival, self.rival_setting or self.setting)]


@dataclass(frozen=True)
class BeatsWithFewerBytes:
    """``method`` at ``setting`` scores above ``rival``'s cell with the fewest bytes among those holding
    at least as many as the method's (mean KV bytes ``held``, within ``tolerance``), chosen from
    ``rival_settings``: the rival is never given less memory, and gets the closest amount above.
    ``held``: a key of :data:`HELD`, the bytes after prefill or the peak between decoding steps."""

    method: str
    rival: str
    task: str
    setting: str
    rival_settings: tuple[str, ...]
    tolerance: float = 0.02
    held: str = "bytes_held"

    def cells(self) -> list[tuple[str, str, str]]:
        return [(self.task, self.method, self.setting), *((self.task, self.rival, s) for s in self.rival_settings)]


@dataclass(frozen=True)
class WithinCapacity:
    """No record of ``method`` at a budget setting held more tokens than the budget in any KV head
    of a compressed layer between steps (``kv.peak_tokens_held``), on any of ``tasks``."""

    method: str
    setting: str
    tasks: tuple[str, ...]

    def cells(self) -> list[tuple[str, str, str]]:
        return [(task, self.method, self.setting) for task in self.tasks]


@dataclass(frozen=True)
class NotOnCpu:
    """A claim the embedded models cannot test; ``reason`` says why."""

    reason: str

    def cells(self) -> list[tuple[str, str, str]]:
        return []


Test = Retention | Beats | BeatsWithFewerBytes | WithinCapacity | NotOnCpu
#: the memory a :class:`BeatsWithFewerBytes` compares (a run-table column) -> how its rows name it
HELD = {"bytes_held": "KV held after prefill", "peak_bytes_held": "peak KV held"}


@dataclass(frozen=True)
class Claim:
    paper: str
    claim: str
    #: the paper's own figure, quoted, with where it stands in the paper
    paper_figure: str
    test: Test
    models: tuple[str, ...] = CPU_MODELS
    #: how kvbench's cells stand to the paper's setting, where it matters for reading the verdict
    note: str = ""


LAGKV = "LagKV (Liang et al. 2025, arXiv 2504.04704)"
MIKV = "MiKV (Yang et al. 2024, arXiv 2402.18096)"
GKV = "G-KV (Liao et al. 2025, arXiv 2512.00504)"
SUBGEN = "SubGen (Zandieh et al. 2024, arXiv 2402.06082)"
BOUNDED = "Predefined capacity (Yi et al. 2024, arXiv 2411.15785)"

LAGKV_2X = ("abstract (v1): \"nearly zero loss when the ratio is 2x\" (LongBench and PasskeyRetrieval); Table 3 "
            "(v2), lag 1024, 2x: 64-digit passkey 99.27 vs full 99.44 (Llama-3.1-8B-Instruct), 99.75 vs 100.00 "
            "(Qwen2.5-7B-Instruct); LongBench average 46.74 vs 47.44, 50.33 vs 51.53")
LAGKV_8X = ("abstract (v1): \"~90% of the original model performance for 8x\"; Table 3 (v2), lag 1024, 8x: "
            "64-digit passkey 86.26 vs 99.44 (Llama), 66.88 vs 100.00 (Qwen); LongBench average 44.31 vs 47.44, "
            "46.73 vs 51.53")
#: the board's lagkv runs (method=board/lagkv): lag 128, the smallest of the paper's grid; the default lag,
#: 1024, compresses nothing below sink + 2 x 1024 tokens, longer than the CPU board's prompts
LAGKV_VARIANT = "_lag_size-128"
LAGKV_NOTE = ("the board runs lagkv at lag 128 (sink 16), the smallest lag of the paper's grid, since the default "
              "1024 compresses nothing below 2064 tokens and the board's prompts are 512-2048 tokens; the paper's "
              "own lag-128 row (Table 3, v2) is its weakest: 64-digit passkey 92.76 / 73.41 / 38.48 / 25.01 at "
              "2x / 4x / 6x / 8x on Llama, 65.93 / 20.83 / 16.18 / 15.07 on Qwen")
GKV_NOTE = ("gkv compresses every divide_length = 128 generated tokens (its authors' schedule), so at budget 128 it "
            "holds between 128 and 255 tokens while snapkv and h2o hold 128: the peak KV held stands next to the "
            "difference, and a second claim gives the rival gkv's peak")
#: the G-KV control's rival budget: no less than the most tokens gkv holds between steps at budget 128 on
#: decode_recall (the budget plus the tokens generated since its last compression: 154 on SmolLM2)
GKV_PEAK_BUDGET = "budget-160"
MIKV_NOTE = ("kvbench's mikv at ratio R keeps round(n / R) important tokens in fp16 and every other token in int2 "
             "(ratio_mode tokens), so it holds more bytes than an eviction at R; its budget counts bytes of 16-bit "
             "tokens, half an H2O budget's bytes on these float32 models. Equal settings are not equal memory, so "
             "H2O's cell is the one with the fewest mean KV bytes after prefill among those holding at least "
             "mikv's (2% tolerance): H2O is never given less memory")
LAGKV_BYTES_NOTE = ("lagkv keeps its sink and its last, partial lag uncompressed, so at these prompt lengths it holds "
                    "more bytes than an eviction at the same nominal ratio: H2O's cell is the one with the fewest "
                    "mean KV bytes after prefill among those holding at least lagkv's (2% tolerance), from its "
                    "ratios 2, 4, 8 and the control ratios 1.5, 2.5, 3.5 (+experiment=leaderboard_cpu_bytes)")
#: h2o's cells for the LagKV equal-memory control: the board's ratios and the control's in-between ones
LAGKV_BYTES_RIVAL = tuple(f"ratio-{r}" for r in ("1.5", "2", "2.5", "3.5", "4", "8"))
LAGKV_H2O = ("abstract (v1): \"outperforms ... H2O over 60% with same compression ratios\" (v2: over 50%); "
             "64-digit passkey at 4x on Llama-3: H2O exact 35%, partial 70.8%; LagKV lag 1024 exact 89%, "
             "partial 96.57%")

CLAIMS: tuple[Claim, ...] = (
    *(Claim(LAGKV, "nearly zero loss at 2x (read: retention >= 95%)", LAGKV_2X, Retention("lagkv", "ratio-2" + LAGKV_VARIANT, tasks, 95),
            note=LAGKV_NOTE)
      for tasks in (("passkey",), RULER_TASKS)),
    *(Claim(LAGKV, "about 90% of the full model at 8x (read: retention >= 85%)", LAGKV_8X,
            Retention("lagkv", "ratio-8" + LAGKV_VARIANT, tasks, 85), note=LAGKV_NOTE) for tasks in (("passkey",), RULER_TASKS)),
    *(Claim(LAGKV, "on 64-digit passkeys, above H2O at the same ratio (direction; the paper's margin is shown)",
            LAGKV_H2O, Beats("lagkv", "h2o", "passkey64", setting + LAGKV_VARIANT, setting), note=LAGKV_NOTE)
      for setting in ("ratio-2", "ratio-4", "ratio-8")),
    *(Claim(LAGKV, "the gain over H2O is not lagkv's extra memory: it holds given no fewer KV bytes",
            "the paper compares methods at the same nominal ratio (no equal-memory control in kvbench's notes)",
            BeatsWithFewerBytes("lagkv", "h2o", "passkey64", setting + LAGKV_VARIANT, LAGKV_BYTES_RIVAL),
            note=LAGKV_BYTES_NOTE) for setting in ("ratio-2", "ratio-4", "ratio-8")),
    Claim(LAGKV, "the same on LongBench with 8B models", LAGKV_8X,
          NotOnCpu("LongBench prompts (thousands of tokens) on 7-8B models need a GPU: see the GPU section")),
    *(Claim(MIKV, "keeping the evicted tokens in low precision recovers what eviction loses (direction: above H2O "
                  "given no fewer bytes)",
            "Section 3.1 (located through a secondary summary; the numbers as kvbench's methods reference quotes them): "
            "Llama-2-7B line retrieval with half the cache evicted, 43% when dropped, 99.8% when the evicted half is "
            "kept in int3",
            BeatsWithFewerBytes("mikv", "h2o", "passkey", setting, ("ratio-2", "ratio-4", "ratio-8", BUDGET)),
            note=MIKV_NOTE) for setting in ("ratio-2", "ratio-4", "ratio-8", BUDGET)),
    *(Claim(GKV, f"the global score beats local-score eviction ({rival}) at the same decode-time budget",
            "abstract: earlier methods use \"token eviction with local attention score, overlooking the long-term "
            "importance of tokens\"; its figures are pass@1 of reasoning models (no number in kvbench's notes)",
            Beats("gkv", rival, "decode_recall", BUDGET), note=GKV_NOTE) for rival in ("snapkv", "h2o")),
    *(Claim(GKV, f"the gain is not gkv's extra memory: it holds against {rival} given no less than gkv's peak",
            "the paper compares methods at the same budget (no equal-peak control in kvbench's notes)",
            BeatsWithFewerBytes("gkv", rival, "decode_recall", BUDGET, (GKV_PEAK_BUDGET,), held="peak_bytes_held"),
            note=GKV_NOTE) for rival in ("snapkv", "h2o")),
    Claim(GKV, "the gain holds for reasoning models over long generations",
          "pass@1 on math and coding under KV budgets, with RL and distillation post-training (abstract)",
          NotOnCpu("reasoning models (7-8B) generating thousands of tokens need a GPU; the post-training is out of "
                   "scope for a training-free benchmark")),
    *(Claim(SUBGEN, f"at an equal cache budget, better than {name} on passkey retrieval",
            "abstract: \"significantly outperforms existing and state-of-the-art KV cache compression methods\"; "
            "line retrieval (5k-9k tokens) and LongBench QA at equal budgets against H2O and attention sinks "
            "(no number in kvbench's notes)",
            Beats("subgen", rival, "passkey", BUDGET)) for rival, name in (("h2o", "H2O"), ("streaming", "attention sinks"))),
    *(Claim(BOUNDED, "the cache never exceeds its predefined capacity",
            "the paper's models keep fixed-length key and value sequences by construction (trained; kvbench runs "
            "the training-free variant `bounded`, and the capacity mode for every method)",
            WithinCapacity(method, BUDGET, CPU_TASKS)) for method in ("bounded", "streaming")),
    *(Claim(BOUNDED, "at that capacity, better than StreamingLLM at the same capacity",
            "qualitative (no number in kvbench's notes)", Beats("bounded", "streaming", task, BUDGET))
      for task in ("passkey", "decode_recall")),
)


@dataclass(frozen=True)
class Verdict:
    """One claim on one model: the cells read, kvbench's figure, its n and the verdict with why."""

    model: str
    cells: str
    figure: str
    n: int | None
    verdict: str
    why: str = ""


def _find(df: pd.DataFrame, model: str, task: str, method: str, setting: str) -> pd.Series | None:
    match = df[(df.model == model) & (df.task == task) & (df.method == method) & (df.setting == setting)]
    return match.iloc[0] if len(match) else None


class _Cells:
    """The runs a test reads, and which of them keep it from being judged."""

    def __init__(self, df: pd.DataFrame, model: str):
        self.df, self.model = df, model
        #: (method/setting, why) -> tasks
        self.unusable: dict[tuple[str, str], list[str]] = {}

    def get(self, task: str, method: str, setting: str) -> pd.Series | None:
        run = _find(self.df, self.model, task, method, setting)
        if run is None:
            why = "missing"
        elif run.state != "complete":
            why = f"{run.state} ({run.n} of {run.n_expected})"
        elif not run.sample_scores:
            why = "without per-sample scores"
        else:
            return run
        self.unusable.setdefault((f"{method}/{setting}", why), []).append(task)
        return None

    def why(self) -> str:
        """The unusable cells, each with its state and tasks ("" when every cell read is usable)."""
        return "; ".join(f"{cell} {state} on {', '.join(tasks)}" for (cell, state), tasks in self.unusable.items())

    def not_run(self, cells: str) -> Verdict:
        return Verdict(self.model, cells, "–", None, NOT_RUN, self.why())


def _shared(reference: dict, run: dict) -> tuple[list[float], list[float]]:
    ids = [i for i in reference if i in run]
    return [reference[i] for i in ids], [run[i] for i in ids]


def _cluster_keys(*runs: pd.Series) -> dict | None:
    """The clusters the runs' samples are compared in (samples sharing a context resample together)."""
    return _clusters(*((run.sample_scores, run.sample_clusters) for run in runs))


def _by_interval(low: float, high: float, edge: float, strict: bool) -> str:
    """The verdict of an interval against the claimed side ``> edge`` (``strict``) or ``>= edge``."""
    if low > edge or (not strict and low >= edge):
        return REPRODUCED
    if high <= edge if strict else high < edge:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def _measured(run: pd.Series) -> str:
    return "n/a" if pd.isna(run.measured_ratio) else f"{run.measured_ratio:.2f}x"


def _untestable(model: str, cells: str, runs: list[pd.Series], method: str) -> Verdict | None:
    """Not testable: a full cache that scores 0 (no method can do better), or a method cell at a
    ratio that compressed nothing. (A budget cell's prompt may fit its budget, as decode_recall's
    does: its compression happens while decoding, which the measured ratio after prefill misses.)"""
    zero = sorted({r.task for r in runs if r.baseline_score == 0})
    if zero:
        return Verdict(model, cells, "–", None, NOT_TESTABLE, f"the full cache scores 0 on {', '.join(zero)}")
    idle = [r for r in runs if r.method == method and pd.isna(r.budget) and pd.notna(r.measured_ratio)
            and r.measured_ratio < COMPRESSED_NOTHING]
    if idle:
        return Verdict(model, cells, "–", None, NOT_TESTABLE,
                       f"{method} compressed nothing on {', '.join(sorted({r.task for r in idle}))} (measured ratio "
                       f"{min(r.measured_ratio for r in idle):.2f}x): these prompts are too short for it")
    return None


def _retention(df: pd.DataFrame, model: str, test: Retention) -> Verdict:
    cells = _Cells(df, model)
    names = f"{test.method}/{test.setting} vs full on {', '.join(test.tasks)}"
    runs = [cells.get(task, test.method, test.setting) for task in test.tasks]
    bases = [cells.get(task, *BASELINE) for task in test.tasks]
    if cells.unusable:
        return cells.not_run(names)
    # retention is undefined where the full cache scores 0: such tasks leave the mean, named
    failed = [run.task for run in runs if run.baseline_score == 0]
    kept = [(base, run) for base, run in zip(bases, runs, strict=True) if run.baseline_score != 0]
    untestable = _untestable(model, names, runs if not kept else [run for _, run in kept], test.method)
    if untestable:
        return untestable
    keys = [_cluster_keys(base, run) for base, run in kept]
    interval = retention_ci([_shared(base.sample_scores, run.sample_scores) for base, run in kept],
                            [k and [k[i] for i in base.sample_scores if i in run.sample_scores]
                             for k, (base, run) in zip(keys, kept, strict=True)])
    ratio = sum(run.measured_ratio for _, run in kept) / len(kept)
    figure = (f"retention {interval.estimate:.1f}% [{interval.low:.1f}, {interval.high:.1f}] "
              f"(measured ratio {ratio:.2f}x)")
    verdict = _by_interval(interval.low, interval.high, test.floor, strict=False)
    why = f"floor {test.floor:g}%" + (f"; left out, the full cache scores 0: {', '.join(failed)}" if failed else "")
    return Verdict(model, names, figure, interval.n, verdict, why)


def _paired(model: str, names: str, run: pd.Series, rival: pd.Series) -> Verdict:
    pair = paired_comparison(rival.sample_scores, run.sample_scores, _cluster_keys(rival, run))
    theirs, mine = (100 * sum(scores) / len(scores) for scores in _shared(rival.sample_scores, run.sample_scores))
    figure = (f"{run.method} {mine:.1f} vs {rival.method} {theirs:.1f}: difference {100 * pair.diff:+.1f} "
              f"[{100 * pair.ci_low:+.1f}, {100 * pair.ci_high:+.1f}] points, p = {pair.p:.3g} ({pair.test}); "
              f"measured ratios {_measured(run)} vs {_measured(rival)}")
    if pd.notna(run.peak_bytes_held) and pd.notna(rival.peak_bytes_held):
        figure += f"; peak KV held {_size(run.peak_bytes_held)} vs {_size(rival.peak_bytes_held)}"
    return Verdict(model, names, figure, pair.n, _by_interval(pair.ci_low, pair.ci_high, 0.0, strict=True))


def _beats(df: pd.DataFrame, model: str, test: Beats) -> Verdict:
    cells = _Cells(df, model)
    (task, method, setting), (_, rival_method, rival_setting) = test.cells()
    names = f"{task}: {method}/{setting} vs {rival_method}/{rival_setting}"
    run, rival = cells.get(task, method, setting), cells.get(task, rival_method, rival_setting)
    if cells.unusable:
        return cells.not_run(names)
    return _untestable(model, names, [run, rival], test.method) or _paired(model, names, run, rival)


def _size(nbytes: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _beats_with_fewer_bytes(df: pd.DataFrame, model: str, test: BeatsWithFewerBytes) -> Verdict:
    cells = _Cells(df, model)
    names = f"{test.task}: {test.method}/{test.setting} vs {test.rival} with no less {HELD[test.held]}"
    run = cells.get(test.task, test.method, test.setting)
    rivals = [cells.get(test.task, test.rival, setting) for setting in test.rival_settings]
    if cells.unusable:
        return cells.not_run(names)
    enough = [r for r in rivals if r[test.held] >= run[test.held] * (1 - test.tolerance)]
    if not enough:
        return Verdict(model, names, "–", None, NOT_TESTABLE,
                       f"no {test.rival} cell of {', '.join(test.rival_settings)} holds as many bytes as "
                       f"{test.method}/{test.setting} ({HELD[test.held]} {_size(run[test.held])})")
    rival = min(enough, key=lambda r: r[test.held])
    names = f"{test.task}: {test.method}/{test.setting} vs {test.rival}/{rival.setting}"
    untestable = _untestable(model, names, [run, rival], test.method)
    if untestable:
        return untestable
    verdict = _paired(model, names, run, rival)
    if test.held == "peak_bytes_held":  # the paired figure shows the peaks already
        return verdict
    held = f"; {HELD[test.held]} {_size(run[test.held])} vs {_size(rival[test.held])}"
    return Verdict(model, names, verdict.figure + held, verdict.n, verdict.verdict)


def _budget(setting: str) -> int:
    kind, _, value = setting.partition("_")[0].partition("-")
    if kind != "budget":
        raise ConfigError(f"a capacity claim needs a budget setting (budget-N), got {setting!r}")
    return int(value)


def _within_capacity(df: pd.DataFrame, model: str, test: WithinCapacity) -> Verdict:
    cells = _Cells(df, model)
    capacity = _budget(test.setting)
    names = f"{test.method}/{test.setting} on {len(test.tasks)} tasks"
    runs = [run for task in test.tasks if (run := cells.get(task, test.method, test.setting)) is not None]
    peaks = [(run.task, record.kv.peak_tokens_held) for run in runs for record in RunDir(Path(run.run_dir)).records()]
    unrecorded = sorted({task for task, peak in peaks if peak is None})
    if unrecorded:
        return Verdict(model, names, "–", None, NOT_RUN, f"records without kv.peak_tokens_held on {', '.join(unrecorded)}")
    if not peaks:
        return cells.not_run(names)
    over = sorted({task for task, peak in peaks if peak > capacity})
    figure = f"most tokens held by a KV head between steps: {max(peak for _, peak in peaks)} (capacity {capacity})"
    if cells.unusable:
        figure += f" on the {len(runs)} complete of {len(test.tasks)}: {', '.join(run.task for run in runs)}"
    if over:  # one record over the capacity refutes it, whatever is still to run
        return Verdict(model, names, figure, len(peaks), NOT_REPRODUCED, f"over capacity on {', '.join(over)}")
    return Verdict(model, names, figure, len(peaks), NOT_RUN if cells.unusable else REPRODUCED, cells.why())


def evaluate(df: pd.DataFrame, claim: Claim) -> list[Verdict]:
    """The claim's verdict on each of its models, from the run table ``df`` (:func:`kvbench.report.collect`)."""
    test = claim.test
    if isinstance(test, NotOnCpu):
        return [Verdict("–", "–", "–", None, NOT_TESTABLE, test.reason)]
    judge = {Retention: _retention, Beats: _beats, BeatsWithFewerBytes: _beats_with_fewer_bytes,
             WithinCapacity: _within_capacity}[type(test)]
    return [judge(df, model, test) for model in claim.models]


# ---------------------------------------------------------------------------------------------
# The same experiment on GPUs: the papers' numbers next to where kvbench's will stand
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuRow:
    """A paper's figure per hub model, next to kvbench's score of the same cells: the mean over the
    complete runs of ``method``/``setting`` on ``tasks``, a task name or a task kind (every task of
    that suite)."""

    source: str
    what: str
    method: str
    setting: str
    tasks: str
    #: the paper's figure per model of :data:`GPU_MODELS`
    paper: tuple[str, str]


LAGKV_TABLE3 = "LagKV v2, Table 3 (64-digit passkey, partial match, sink 16)"
LAGKV_LONGBENCH = "LagKV v2, LongBench average (rows of Table 3)"
#: the GPU sweep runs lagkv at its default lag, 1024: the paper's headline rows
GPU_ROWS: tuple[GpuRow, ...] = (
    GpuRow(LAGKV_LONGBENCH, "full cache", "full", "ratio-1", "longbench", ("47.44", "51.53")),
    *(GpuRow(LAGKV_LONGBENCH, f"lagkv lag 1024, {r}x", "lagkv", f"ratio-{r}", "longbench", (llama, qwen))
      for r, llama, qwen in ((2, "46.74", "50.33"), (4, "45.54", "48.15"), (8, "44.31", "46.73"))),
    GpuRow(LAGKV_TABLE3, "full cache", "full", "ratio-1", "passkey64", ("99.44", "100.00")),
    *(GpuRow(LAGKV_TABLE3, f"lagkv lag 1024, {r}x", "lagkv", f"ratio-{r}", "passkey64", (llama, qwen))
      for r, llama, qwen in ((2, "99.27", "99.75"), (4, "96.57", "96.98"), (8, "86.26", "66.88"))),
    GpuRow("LagKV v2 (reference notes): H2O on Llama-3, 64-digit passkey", "h2o 4x", "h2o", "ratio-4", "passkey64",
           ("70.8 (exact 35%)", "–")),
)


def gpu_figure(df: pd.DataFrame, model: str, row: GpuRow) -> str:
    """kvbench's mean score over the complete runs of the row's cells on ``model``, with how many
    tasks it covers and how many were run; "not run yet" without any."""
    runs = df[(df.model == model) & ((df.task == row.tasks) | (df.suite == row.tasks)) & (df.method == row.method)
              & (df.setting == row.setting)]
    done = runs[runs.state == "complete"]
    if done.empty:
        return NOT_RUN
    mean = done.score.mean()
    tasks = f" ({len(done)} of {len(runs)} tasks complete)" if len(runs) > 1 or len(done) < len(runs) else ""
    return ("n/a" if math.isnan(mean) else f"{mean:.2f}") + tasks
