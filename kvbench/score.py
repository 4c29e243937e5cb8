"""Score LongBench predictions with the official metrics: ``python -m kvbench.score FILE_OR_DIR``.

Input is a JSONL file, or a directory searched recursively: if the directory holds any
``samples.jsonl`` (a kvbench results directory) only those files are read, otherwise every
``*.jsonl`` file. Each non-blank line is a JSON object with ``task``, ``pred``, ``answers`` (list of
str) and optionally ``all_classes`` (list of str or null) and ``length`` (number). Records are
pooled by ``task`` across files and the result of
:func:`kvbench.scoring.longbench.summarize` is printed on stdout as JSON (sorted keys, indent 2).
An empty LongBench-E bucket prints as ``NaN``, as in the official result.json.

Any problem in the input (malformed JSON, missing or mistyped field, unknown task) stops the run
with exit status 1 and a message on stderr naming the file and the 1-based line number.
No Hydra: this only reads and prints.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kvbench.scoring.longbench import PARAGRAPH_PATTERNS, TASKS, base_task, summarize

RESULTS_FILE = "samples.jsonl"


class InputError(Exception):
    """A problem in the input files; the message names the file and line."""


def find_jsonl_files(path: Path) -> list[Path]:
    """The files to read for ``path`` (a file, or a directory as described in the module doc)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or directory")
    samples = sorted(path.rglob(RESULTS_FILE))
    files = samples or sorted(path.rglob("*.jsonl"))
    if not files:
        raise InputError(f"{path}: no *.jsonl file found")
    return files


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_record(record: Any, where: str) -> dict[str, Any]:
    """Validate one parsed line; ``where`` is "FILE:LINE" for the messages."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("task", "pred", "answers"):
        if field not in record:
            raise InputError(f"{where}: missing required field {field!r}")
    if not isinstance(record["task"], str):
        raise InputError(f"{where}: field 'task' must be a string")
    if not isinstance(record["pred"], str):
        raise InputError(f"{where}: field 'pred' must be a string")
    if not _is_str_list(record["answers"]):
        raise InputError(f"{where}: field 'answers' must be a list of strings")
    all_classes = record.get("all_classes")
    if all_classes is not None and not _is_str_list(all_classes):
        raise InputError(f"{where}: field 'all_classes' must be a list of strings or null")
    length = record.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float))):
        raise InputError(f"{where}: field 'length' must be a number")
    try:
        task = base_task(record["task"])
    except KeyError as err:
        raise InputError(f"{where}: {err.args[0]}") from None
    # Metric preconditions, checked here so the message can name the line.
    metric = TASKS[task]["metric"]
    if metric == "classification" and all_classes is None:
        raise InputError(f"{where}: task {record['task']!r} needs field 'all_classes'")
    if metric in PARAGRAPH_PATTERNS:
        for answer in record["answers"]:
            if not re.search(PARAGRAPH_PATTERNS[metric], answer):
                raise InputError(f"{where}: gold answer {answer!r} has no paragraph id "
                                 f"matching {PARAGRAPH_PATTERNS[metric]!r}")
    return record


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the checked records of one JSONL file; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: malformed JSON line: {err}") from None
            yield _check_record(record, where)


def score_path(path: Path) -> dict[str, dict[str, Any]]:
    """Read every record under ``path`` and summarize them."""
    records = [record for file in find_jsonl_files(path) for record in read_records(file)]
    if not records:
        raise InputError(f"{path}: no records")
    return summarize(records)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvbench.score",
        description="Score LongBench predictions (JSONL) with the official LongBench metrics.",
    )
    parser.add_argument("path", type=Path, metavar="FILE_OR_DIR",
                        help="a JSONL file, or a directory searched recursively")
    args = parser.parse_args(argv)
    try:
        summary = score_path(args.path)
    except (InputError, ValueError) as err:  # ValueError: a metric refused a gold answer
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
