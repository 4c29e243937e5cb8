"""Official LongBench v1 / LongBench-E scoring, as pure functions.

This module reproduces ``LongBench/metrics.py`` and ``LongBench/eval.py`` of THUDM/LongBench so that
kvbench numbers can be put next to published LongBench tables. The official behaviour is kept on
purpose, quirks included (each is pointed out where it happens):

* ``classification`` removes from a list while iterating over it, which skips elements;
* ``rouge`` is the PyPI ``rouge`` package (1.0.1): case-sensitive, word *sets*, sentences split on
  ".", summary-level union LCS; any exception (empty hypothesis, RecursionError on long LCS paths)
  gives 0.0;
* ``code_sim`` uses fuzzywuzzy's ``ratio`` on the difflib backend (integer percent, ``round``);
* per-task scores use Python's ``round`` while LongBench-E buckets use ``round`` on a numpy float
  (numpy's rounding), exactly as eval.py does.

Deviations from the official code (none changes a score on the official data):

* ``all_classes`` is taken per record; eval.py uses the value of the *last* line of a file for
  every line (identical across a task's examples in the official data).
* errors in the input (classification without ``all_classes``, retrieval gold without a paragraph
  id, an unknown task) raise ``ValueError``/``KeyError`` with a message instead of a bare
  ``TypeError``/``IndexError``.
* ``rouge`` catches ``Exception`` rather than everything (a bare ``except`` would also swallow
  KeyboardInterrupt); RecursionError, the one that matters, is an Exception.

Google's ``rouge-score`` is available as :func:`rouge_score_l`, an extra column that is NOT the
LongBench score.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jieba
import numpy as np
import yaml
from fuzzywuzzy import utils as _fuzz_utils
from rouge import Rouge

from kvbench.tasks.base import TASK_DATA

# jieba logs its dictionary loading ("Building prefix dict ...") to stderr at DEBUG level on first
# use; raise only jieba's own logger to INFO so the CLI's stderr carries just kvbench's messages.
jieba.setLogLevel(logging.INFO)

__all__ = [
    "CATEGORIES",
    "E_TASKS",
    "FIRST_LINE_TASKS",
    "METRICS",
    "PARAGRAPH_PATTERNS",
    "TASKS",
    "TASKS_YAML",
    "base_task",
    "category_means",
    "classification",
    "code_sim",
    "count",
    "normalize_answer",
    "normalize_zh_answer",
    "overall_mean",
    "qa_f1",
    "qa_f1_zh",
    "retrieval",
    "retrieval_zh",
    "rouge",
    "rouge_score_l",
    "rouge_zh",
    "score_sample",
    "summarize",
    "task_score",
    "task_score_e",
]

# ---------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------

_EN_PUNCTUATION = frozenset(string.punctuation)
# The official list, character for character (it ends with an ASCII "." already in
# string.punctuation, and has "》" without "《": kept as is, since it decides what is dropped).
_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ZH_PUNCTUATION = frozenset(string.punctuation + _CN_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, replace the words a/an/the by a space, collapse spaces.

    The order matters and is the official one: punctuation goes *before* articles, so
    "state-of-the-art" becomes the single word "stateoftheart" (its "the" survives).
    """
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _EN_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(s: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, remove all whitespace (not collapse)."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _ZH_PUNCTUATION)
    return "".join(text.split())


# ---------------------------------------------------------------------------------------------
# Metrics: metric(prediction, ground_truth, **kwargs) -> float
# ---------------------------------------------------------------------------------------------


def _f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap); 0 when nothing overlaps (also covers empty inputs)."""
    num_same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def qa_f1(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 over whitespace tokens of the normalized strings (official ``qa_f1_score``)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    # jieba precise mode; normalize each token, then drop the ones that became empty
    # (punctuation and whitespace tokens).
    tokens = (normalize_zh_answer(tok) for tok in jieba.cut(text, cut_all=False))
    return [tok for tok in tokens if len(tok) > 0]


def qa_f1_zh(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 over jieba tokens (official ``qa_f1_zh_score``)."""
    return _f1(_zh_tokens(prediction), _zh_tokens(ground_truth))


def rouge(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F of the PyPI ``rouge`` package (official ``rouge_score``).

    The library raises on an empty hypothesis (also one made only of "."), and its recursive LCS
    reconstruction raises RecursionError once the LCS path is about 1000 words long; the official
    code turns every exception into 0.0, and so do we.
    """
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # noqa: BLE001 - official behaviour: any failure scores 0.0
        return 0.0
    return scores["rouge-l"]["f"]


def _jieba_join(text: str) -> str:
    return " ".join(jieba.cut(text, cut_all=False))


def rouge_zh(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """``rouge`` on jieba-segmented text joined by spaces (official ``rouge_zh_score``)."""
    return rouge(_jieba_join(prediction), _jieba_join(ground_truth))


def classification(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Official ``classification_score``: 1/len(matches) if the gold label is among the matches.

    Matches are the classes of ``all_classes`` that occur as substrings of the prediction; the
    ones that are substrings of the gold label (but not equal to it) are then dropped.
    """
    all_classes = kwargs.get("all_classes")
    if all_classes is None:
        raise ValueError("classification needs all_classes (a list of class names)")
    matches = [name for name in all_classes if name in prediction]
    # QUIRK (kept on purpose): the official loop removes from the list it iterates over. After a
    # removal the next element slides into the current index and the iterator steps past it, so
    # an element right after a removed one is never examined and stays in the list, which lowers
    # the score to 1/len(matches). Iterating over a copy would change published numbers.
    for term in matches:
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    # (One official revision wraps the next test in `if em_match_list != 0:`, a list compared to
    # an int, always true; its difflib fallback branch is dead code and is not reproduced.)
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


# Where the retrieval metrics read the gold paragraph id (first match in the gold answer).
PARAGRAPH_PATTERNS = {"retrieval": r"Paragraph (\d+)", "retrieval_zh": r"段落(\d+)"}


def _number_share(prediction: str, target: str) -> float:
    """Share of the numbers (\\d+ runs) in the prediction that equal ``target`` as strings."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for number in numbers if number == target) / len(numbers)


def _paragraph_id(metric: str, ground_truth: str) -> str:
    pattern = PARAGRAPH_PATTERNS[metric]
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"gold answer {ground_truth!r} has no paragraph id matching {pattern!r}")
    return found[0]


def retrieval(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Gold id from ``Paragraph (\\d+)``; share of the prediction's numbers equal to it."""
    return _number_share(prediction, _paragraph_id("retrieval", ground_truth))


def retrieval_zh(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Gold id from ``段落(\\d+)``; share of the prediction's numbers equal to it."""
    return _number_share(prediction, _paragraph_id("retrieval_zh", ground_truth))


def count(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the prediction's numbers equal to the gold count (compared as strings)."""
    return _number_share(prediction, str(ground_truth))


# fuzzywuzzy 0.18 picks its backend at import time: python-Levenshtein's StringMatcher when that
# package is importable, else difflib.SequenceMatcher. The two give different ratios on some
# pairs. The official requirements install fuzzywuzzy alone, so published numbers come from the
# difflib backend, and kvbench pins fuzzywuzzy without python-Levenshtein. Rather than detect and
# warn, we FORCE that path: the function below is fuzz.ratio's body (same None/equal/empty
# guards, same int(round(...)) via fuzzywuzzy's own helpers) with difflib.SequenceMatcher fixed
# as the matcher, so the score cannot depend on what else is installed. Importing
# fuzzywuzzy.utils (not fuzzywuzzy.fuzz) also avoids fuzz's "slow pure-python" import warning.
# SequenceMatcher keeps its default autojunk=True, as fuzzywuzzy does.
@_fuzz_utils.check_for_none
@_fuzz_utils.check_for_equivalence
@_fuzz_utils.check_empty_string
def _fuzz_ratio_difflib(s1: str, s2: str) -> int:
    s1, s2 = _fuzz_utils.make_type_consistent(s1, s2)
    return _fuzz_utils.intr(100 * difflib.SequenceMatcher(None, s1, s2).ratio())


def _first_code_line(prediction: str) -> str:
    """First line with none of "`", "#", "//" (markdown fences, comments); "" if none.

    The line is not stripped: leading indentation counts in the similarity.
    """
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """fuzzywuzzy ``ratio`` (difflib backend, integer percent) / 100 of the first code line."""
    return _fuzz_ratio_difflib(_first_code_line(prediction), ground_truth) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge": rouge,
    "rouge_zh": rouge_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}


def rouge_score_l(pred: str, gold: str, *, use_stemmer: bool = False) -> float:
    """ROUGE-L F from Google's ``rouge-score`` package. NOT the LongBench score.

    Only an extra column for comparison with papers that use rouge-score: it lowercases, keeps
    only [a-z0-9] tokens (Chinese text scores 0), and computes sentence-level LCS over token
    lists, so it differs from :func:`rouge`.
    """
    from rouge_score import rouge_scorer  # lazy: only needed for this extra column

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return scorer.score(gold, pred)["rougeL"].fmeasure


# ---------------------------------------------------------------------------------------------
# Task table (kvbench/task_data/longbench/tasks.yaml)
# ---------------------------------------------------------------------------------------------

TASKS_YAML = TASK_DATA / "longbench" / "tasks.yaml"
_REQUIRED_FIELDS = {
    "metric": str,
    "language": str,
    "category": str,
    "max_new_tokens": int,
    "chat_template": bool,
    "first_line_only": bool,
    "has_e": bool,
}


def _load_tasks(path: Path) -> dict[str, dict[str, Any]]:
    """Read and check the task table; extra fields per task (e.g. prompts) are kept."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    tasks = data["tasks"]
    for name, spec in tasks.items():
        for field, kind in _REQUIRED_FIELDS.items():
            if not isinstance(spec.get(field), kind):
                raise ValueError(
                    f"{path}: task {name!r}: field {field!r} must be a {kind.__name__}"
                )
        if spec["metric"] not in METRICS:
            raise ValueError(f"{path}: task {name!r}: unknown metric {spec['metric']!r}")
    return tasks


TASKS: dict[str, dict[str, Any]] = _load_tasks(TASKS_YAML)
# The 13 tasks with a LongBench-E config `{task}_e`.
E_TASKS: frozenset[str] = frozenset(name for name, spec in TASKS.items() if spec["has_e"])
# eval.py's hard-coded list ["trec", "triviaqa", "samsum", "lsht"].
FIRST_LINE_TASKS: frozenset[str] = frozenset(n for n, s in TASKS.items() if s["first_line_only"])
# Categories in table order (the README's column order).
CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(spec["category"] for spec in TASKS.values()))


def base_task(task: str) -> str:
    """``hotpotqa_e`` -> ``hotpotqa``; raise KeyError for a name that is not a LongBench task."""
    if task in TASKS:
        return task
    if task.endswith("_e") and task[:-2] in E_TASKS:
        return task[:-2]
    valid = sorted(TASKS) + sorted(f"{name}_e" for name in E_TASKS)
    raise KeyError(f"unknown LongBench task {task!r}; valid tasks: {', '.join(valid)}")


# ---------------------------------------------------------------------------------------------
# Aggregation (eval.py scorer / scorer_e, README tables)
# ---------------------------------------------------------------------------------------------


def score_sample(
    task: str, pred: str, answers: Sequence[str], all_classes: Sequence[str] | None = None
) -> float:
    """One example's score, as in eval.py's ``scorer``: max(0, max over gold answers).

    For trec/triviaqa/samsum/lsht (also their ``_e`` variants) only the first line of the
    prediction counts, after leading newlines are dropped.
    """
    name = base_task(task)
    metric = METRICS[TASKS[name]["metric"]]
    if name in FIRST_LINE_TASKS:
        pred = pred.lstrip("\n").split("\n")[0]
    score = 0.0  # the official running max starts at 0., so no answers -> 0 and scores are >= 0
    for ground_truth in answers:
        score = max(score, metric(pred, ground_truth, all_classes=all_classes))
    return float(score)


def task_score(scores: Sequence[float]) -> float:
    """``round(100 * sum / n, 2)`` with a plain Python sum in order and Python's round (eval.py)."""
    if len(scores) == 0:
        raise ValueError("task_score needs at least one score")  # eval.py divides by zero here
    total = 0.0
    for score in scores:  # same summation order as eval.py's `total_score += score`
        total += score
    return round(100 * total / len(scores), 2)


_BUCKETS = ("0-4k", "4-8k", "8k+")


def _bucket(length: float) -> str:
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def task_score_e(scores: Sequence[float], lengths: Sequence[float]) -> dict[str, float]:
    """LongBench-E buckets by the ``length`` field: <4000, <8000, else; each round(100*mean, 2).

    As in eval.py's ``scorer_e`` the mean is ``np.mean`` and ``round`` is applied to the numpy
    float, i.e. numpy's rounding (which can differ from Python's in the last digit, e.g. 2.675 ->
    2.68 where Python gives 2.67). An empty bucket is NaN, as in the official result.json
    (np.mean of an empty list; returned directly here, without numpy's warning).
    Values are Python floats.
    """
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores but {len(lengths)} lengths")
    buckets: dict[str, list[float]] = {key: [] for key in _BUCKETS}
    for score, length in zip(scores, lengths):
        buckets[_bucket(length)].append(score)
    result = {}
    for key, values in buckets.items():
        if not values:
            result[key] = math.nan
            continue
        result[key] = float(round(100 * np.mean(values), 2))
    return result


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Score records grouped by their ``task`` field.

    Each record has ``task``, ``pred``, ``answers`` and optionally ``all_classes`` and ``length``.
    Returns ``{task: {"score": float, "score_e": {"0-4k", "4-8k", "8k+"} or None, "n": int}}``,
    tasks in order of first appearance. ``score_e`` is computed whenever every record of the task
    has a ``length`` (meaningful for ``_e`` tasks) and is None otherwise.
    """
    per_task: dict[str, list[tuple[float, Any]]] = {}
    for record in records:
        score = score_sample(
            record["task"], record["pred"], record["answers"], record.get("all_classes")
        )
        per_task.setdefault(record["task"], []).append((score, record.get("length")))

    summary = {}
    for task, rows in per_task.items():
        scores = [score for score, _ in rows]
        lengths = [length for _, length in rows]
        has_lengths = all(length is not None for length in lengths)
        summary[task] = {
            "score": task_score(scores),
            "score_e": task_score_e(scores, lengths) if has_lengths else None,
            "n": len(scores),
        }
    return summary


def category_means(task_scores: Mapping[str, float]) -> dict[str, float]:
    """Mean task score per category, over the tasks present (README tables), categories in
    table order. ``_e`` names count for their base task; mixing a task with its ``_e`` variant
    is refused, since LongBench and LongBench-E scores do not belong in one mean."""
    by_category: dict[str, list[float]] = {}
    seen: dict[str, str] = {}
    for task, score in task_scores.items():
        name = base_task(task)
        if name in seen:
            raise ValueError(f"both {seen[name]!r} and {task!r} given; score LongBench and "
                             "LongBench-E separately")
        seen[name] = task
        by_category.setdefault(TASKS[name]["category"], []).append(score)
    return {
        category: sum(by_category[category]) / len(by_category[category])
        for category in CATEGORIES
        if category in by_category
    }


def overall_mean(category_scores: Mapping[str, float]) -> float:
    """Mean of the category scores (the README's overall average); not rounded."""
    if not category_scores:
        raise ValueError("overall_mean needs at least one category score")
    return sum(category_scores.values()) / len(category_scores)
