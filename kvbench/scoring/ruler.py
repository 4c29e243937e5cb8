"""RULER scorers, as NVIDIA/RULER's ``scripts/eval/synthetic/constants.py`` and ``evaluate.py``
define them.

A prediction is post-processed (stripped, control characters turned into newlines, stripped again),
then every reference is looked for in it as a case-insensitive substring:

- ``string_match_all`` (niah, vt, cwe, fwe): per sample, the fraction of references found;
- ``string_match_part`` (qa): per sample, 1 if any reference is found.

The task score is the mean over samples x 100, rounded to 2 decimals, computed as RULER computes
it (the sum over samples divided by their number, then x 100). RULER's tables average the tasks'
scores at each length, average those over lengths (plainly and weighted towards long or short
lengths, :func:`weighted_average`), and give the effective length (:func:`effective_length`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from kvbench.tasks.base import TASK_DATA

#: RULER's prompts and the 13 tasks of its ``synthetic.yaml`` (generators and their arguments)
with open(TASK_DATA / "ruler" / "tasks.yaml") as _f:
    SPEC: dict[str, Any] = yaml.safe_load(_f)
#: the task names, in synthetic.yaml's order
TASK_NAMES = tuple(SPEC["tasks"])
#: results and ``kvbench.score`` records name a RULER task ``ruler/<name>``
PREFIX = "ruler/"

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(pred: str) -> str:
    """evaluate.py's post-processing of a prediction."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def match_all(pred: str, refs: Sequence[str]) -> float:
    """One sample of ``string_match_all``: the fraction of references found in the prediction."""
    pred = postprocess_pred(pred).lower()
    return sum(1.0 if r.lower() in pred else 0.0 for r in refs) / len(refs)


def match_part(pred: str, refs: Sequence[str]) -> float:
    """One sample of ``string_match_part``: 1.0 if any reference is found in the prediction."""
    pred = postprocess_pred(pred).lower()
    return max(1.0 if r.lower() in pred else 0.0 for r in refs)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return round(sum(match_all(p, r) for p, r in zip(preds, refs)) / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return round(sum(match_part(p, r) for p, r in zip(preds, refs)) / len(preds) * 100, 2)


def metric_of(task: str) -> str:
    """``string_match_part`` for the qa tasks, ``string_match_all`` for the others (RULER's
    ``dataset2metric``, keyed by the name before the first underscore)."""
    return "string_match_part" if task.startswith("qa") else "string_match_all"


SAMPLE_SCORERS = {"string_match_all": match_all, "string_match_part": match_part}
TASK_SCORERS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def base_task(task: str) -> str:
    """``ruler/vt`` -> ``vt``; raise KeyError for a name that is not a RULER task."""
    name = task[len(PREFIX):] if task.startswith(PREFIX) else None
    if name not in TASK_NAMES:
        raise KeyError(f"unknown RULER task {task!r}; valid tasks: "
                       f"{', '.join(PREFIX + n for n in TASK_NAMES)}")
    return name


def task_score(task: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's score of one task's predictions."""
    return TASK_SCORERS[metric_of(base_task(task))](preds, refs)


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{task: {"score": float, "n": int}}`` of records with ``task`` (``ruler/<name>``), ``pred``
    and ``answers``, grouped by task in order of first appearance."""
    per_task: dict[str, tuple[list[str], list[list[str]]]] = {}
    for record in records:
        preds, refs = per_task.setdefault(record["task"], ([], []))
        preds.append(record["pred"])
        refs.append(record["answers"])
    return {task: {"score": task_score(task, preds, refs), "n": len(preds)}
            for task, (preds, refs) in per_task.items()}


#: RULER's threshold for the effective length: Llama-2-7B-chat's score at 4K
EFFECTIVE_THRESHOLD = 85.6


def weighted_average(scores: Mapping[int, float], increasing: bool) -> float:
    """RULER's wAvg of per-length scores: weights 1, 2, ..., k over the lengths in ascending order
    (``increasing``, "inc") or in descending order ("dec"), normalised to sum to 1."""
    ordered = [scores[n] for n in sorted(scores)]
    weights = range(1, len(ordered) + 1) if increasing else range(len(ordered), 0, -1)
    return sum(w * v for w, v in zip(weights, ordered)) / sum(weights)


def effective_length(scores: Mapping[int, float], threshold: float = EFFECTIVE_THRESHOLD) -> int | None:
    """RULER's effective length of per-length scores: the longest length up to which every score
    exceeds the threshold (strictly, as RULER's README marks the scores "exceeding" it); None when
    the shortest length does not. RULER writes the first ">{longest}" and the second "<{shortest}"."""
    best = None
    for length in sorted(scores):
        if not scores[length] > threshold:
            break
        best = length
    return best
