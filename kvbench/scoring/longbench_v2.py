"""LongBench v2 scoring, as the official ``pred.py`` (answer extraction) and ``result.py``
(accuracies) of THUDM/LongBench define it.

- :func:`extract_answer`: asterisks are removed, then the first ``The correct answer is (X)`` with X
  in A-D, else the first ``The correct answer is X``; otherwise no answer. The match is
  case-sensitive and takes the first occurrence; the fallback also matches the first letter of a
  word ("The correct answer is Because" reads B), as the official regex does.
- a prediction is correct when the extracted letter equals the gold letter (no answer is wrong).
- accuracies, x100 rounded to 1 decimal as result.py prints them: ``accuracy`` over all questions,
  ``easy`` / ``hard`` by ``difficulty`` (anything but "easy" is hard) and ``short`` / ``medium`` /
  ``long`` by ``length`` (anything but "short" or "medium" is long). result.py divides by zero on
  an empty group; here an empty group is left out.

pred.py skips a question whose API call returned an empty string (a failed request); a model run
locally that generates nothing has answered, wrongly, so kvbench counts it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

#: the task name in results and in ``kvbench.score`` records
TASK = "longbench_v2"
CHOICES = ("A", "B", "C", "D")
DIFFICULTIES = ("easy", "hard")
LENGTHS = ("short", "medium", "long")
#: the record fields ``kvbench.score`` needs besides task, pred and answers
RECORD_FIELDS = ("difficulty", "length")

_ANSWER = re.compile(r"The correct answer is \(([A-D])\)")
_FALLBACK = re.compile(r"The correct answer is ([A-D])")


def extract_answer(response: str) -> str | None:
    """pred.py's ``extract_answer``: the chosen letter, or None."""
    response = response.replace("*", "")
    match = _ANSWER.search(response) or _FALLBACK.search(response)
    return match.group(1) if match else None


def judge(response: str, answer: str) -> float:
    """1.0 when the response's extracted letter is the gold letter, else 0.0."""
    return float(extract_answer(response) == answer)


def accuracies(judged: Iterable[tuple[float, str, str]]) -> dict[str, float]:
    """result.py's accuracies of (correct, difficulty, length) triples."""
    groups: dict[str, list[float]] = {"accuracy": []}
    for correct, difficulty, length in judged:
        groups["accuracy"].append(correct)
        groups.setdefault("easy" if difficulty == "easy" else "hard", []).append(correct)
        groups.setdefault(length if length in ("short", "medium") else "long", []).append(correct)
    order = ("accuracy", *DIFFICULTIES, *LENGTHS)
    return {name: round(100 * sum(groups[name]) / len(groups[name]), 1) for name in order if groups.get(name)}


def check_record(record: Mapping[str, Any]) -> None:
    """A ValueError unless a ``kvbench.score`` record has one gold letter and string difficulty and
    length fields."""
    answers = record["answers"]
    if len(answers) != 1 or answers[0] not in CHOICES:
        raise ValueError(f"field 'answers' must hold one letter of {CHOICES}, got {answers!r}")
    for name in RECORD_FIELDS:
        if not isinstance(record.get(name), str):
            raise ValueError(f"task '{TASK}' needs a string field '{name}' (difficulty: {DIFFICULTIES}, "
                             f"length: {LENGTHS})")


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{"longbench_v2": {accuracies..., "n": int}}`` of records with ``pred``, ``answers`` (the gold
    letter), ``difficulty`` and ``length``; empty without records."""
    judged = [(judge(r["pred"], r["answers"][0]), r["difficulty"], r["length"]) for r in records]
    return {TASK: {**accuracies(judged), "n": len(judged)}} if judged else {}
