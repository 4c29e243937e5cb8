"""Score saved predictions: ``python -m kvbench.score FILE_OR_DIR [--write]``.

A directory holding kvbench results directories (a ``run.json`` next to its ``samples.jsonl``, as
every run writes) is scored run by run: each run's task is rebuilt from the identity in its
run.json through the task registry (any task kind: passkey, LongBench, RULER, the math tasks), its
records are read by the results reader (:func:`kvbench.results.read_samples`: de-duplicated by
sample id, the first record winning; a line cut short by a killed write skipped with a warning;
corrupt lines skipped with a warning naming ``file:line``), every record is re-scored with the
task's scorer (the one generation used), and the runner's ``summarize_run`` gives the run's
scores. The scores.json contents are printed as JSON keyed by directory; nothing is written.

Anything else, a JSONL file or a directory of them, is scored with the official LongBench metrics,
and records of RULER tasks (``task`` ``ruler/<name>``) with RULER's
(:func:`kvbench.scoring.ruler.summarize`), pooled by ``task`` across files. In a directory, only
``samples.jsonl`` files are read if there are any, otherwise every ``*.jsonl`` file. Each non-blank
line is a JSON object with ``task``, ``pred``, ``answers`` (list of str) and optionally
``all_classes`` (list of str or null) and ``length`` (number); records that keep them in ``meta``
are read from there (``length`` only for ``_e`` tasks, the only ones eval.py buckets by length).
The result of :func:`kvbench.scoring.longbench.summarize` is printed on stdout as JSON (sorted keys,
indent 2). An empty LongBench-E bucket prints as ``NaN``, as in the official result.json. Any
problem in such input (malformed JSON, missing or mistyped field, unknown task) stops the run with
exit status 1 and a message on stderr naming the file and the 1-based line number.

``--write`` stores the re-scored results instead (e.g. after a scorer fix): each results
directory's ``samples.jsonl`` is rewritten atomically with the re-scored records (de-duplicated,
in the same order; lines cut short by a killed write, which never held a whole record, are not
kept) and its ``scores.json`` with the new scores, which are also printed. A directory with a
corrupt line is refused, naming ``file:line``: a rewrite would drop it. Everything is computed and
checked before anything is written, so an error leaves every directory untouched.

No Hydra: this only reads, and with ``--write`` rewrites scores.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.results import (SAMPLES, RunDir, RunScores, Samples, find_runs, read_jsonl_strict, record_line,
                             write_atomic)
from kvbench.scoring import ruler
from kvbench.scoring.longbench import PARAGRAPH_PATTERNS, TASKS, base_task, summarize

RESULTS_FILE = SAMPLES


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
    _lift_meta(record)
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
    if record["task"].startswith(ruler.PREFIX):
        try:
            ruler.base_task(record["task"])
        except KeyError as err:
            raise InputError(f"{where}: {err.args[0]}") from None
        return record
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


def _lift_meta(record: dict[str, Any]) -> None:
    """A kvbench results record keeps ``all_classes`` and ``length`` in ``meta``; use them."""
    meta = record.get("meta")
    if not isinstance(meta, dict):
        return
    if "all_classes" in meta:
        record.setdefault("all_classes", meta["all_classes"])
    # eval.py computes the length buckets only for LongBench-E; don't add them to v1 tasks
    if "length" in meta and record["task"].endswith("_e"):
        record.setdefault("length", meta["length"])


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the checked records of one JSONL file; blank lines are skipped."""
    for where, record in read_jsonl_strict(path, InputError):
        yield _check_record(record, where)


def score_path(path: Path) -> dict[str, dict[str, Any]]:
    """Score everything under ``path`` as the module docstring says, without writing."""
    runs = find_runs(path) if path.is_dir() else []
    if runs:
        return {str(run.run_dir.path): run.scores.to_json() for run in map(_rescored, runs)}
    records = [record for file in find_jsonl_files(path) for record in read_records(file)]
    if not records:
        raise InputError(f"{path}: no records")
    is_ruler = [r["task"].startswith(ruler.PREFIX) for r in records]
    return {**summarize([r for r, x in zip(records, is_ruler) if not x]),
            **ruler.summarize([r for r, x in zip(records, is_ruler) if x])}


# ---------------------------------------------------------------------------------------------
# --write: re-score kvbench results directories in place
# ---------------------------------------------------------------------------------------------


def _task_of(run_dir: RunDir):
    """The run's task, rebuilt from the identity recorded in run.json, and its n_expected.

    The stored parameters were validated when the run started; they are not validated again, so
    a run can be re-scored where its data (e.g. a LongBench data_dir) is not available.
    """
    from kvbench.tasks import task_from_identity

    try:
        info = run_dir.read_run()
        return task_from_identity(info.identity.task), info.n_expected
    except (KeyError, TypeError, ValueError) as err:  # ValueError: SchemaError, an unknown task kind
        raise InputError(f"{run_dir.path / 'run.json'}: no usable task identity ({err})") from None


def _file_state(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass
class _Rescored:
    run_dir: RunDir
    #: samples.jsonl's (size, mtime) when it was read
    state: tuple[int, int] | None
    samples: Samples
    scores: RunScores


def _rescored(run_dir: RunDir) -> _Rescored:
    """A results directory's records re-scored with its task's scorer, and its new scores."""
    from kvbench.runner import summarize_run  # lazy: pulls in torch, not needed for LongBench files

    task, n_expected = _task_of(run_dir)
    state = _file_state(run_dir.samples_path)
    samples = run_dir.read_samples()
    for record in samples.records:
        record.scores = task.score(record)
    return _Rescored(run_dir, state, samples, summarize_run(task, samples.records, n_expected))


def rescore(path: Path) -> dict[str, dict[str, Any]]:
    """Re-score every kvbench results directory under ``path`` in place; return the new scores.json
    contents by directory."""
    if not path.is_dir():
        raise InputError(f"{path}: --write needs a kvbench results directory")
    runs = find_runs(path)
    if not runs:
        raise InputError(f"{path}: no kvbench results directory (run.json) found")
    planned = [_rescored(run_dir) for run_dir in runs]
    corrupt = [problem for run in planned for problem in run.samples.corrupt]
    if corrupt:
        raise InputError("not rewriting samples.jsonl files with corrupt lines, which a rewrite would "
                         "drop; repair or remove them first:\n  " + "\n  ".join(corrupt))
    written = {}
    for run in planned:
        samples_path = run.run_dir.samples_path
        if _file_state(samples_path) != run.state:  # a run appended meanwhile: don't lose it
            raise InputError(f"{samples_path} changed while re-scoring (is a run writing "
                             "to it?); nothing more written, run again when it is done")
        if run.state is not None:
            write_atomic(samples_path, "".join(record_line(r.to_json()) for r in run.samples.records))
        run.run_dir.write_scores(run.scores)
        written[str(run.run_dir.path)] = run.scores.to_json()
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvbench.score",
        description="Score kvbench results directories with each run's task, or LongBench/RULER "
                    "prediction files (JSONL) with the official metrics.",
    )
    parser.add_argument("path", type=Path, metavar="FILE_OR_DIR",
                        help="a JSONL file, or a directory searched recursively")
    parser.add_argument("--write", action="store_true",
                        help="re-score kvbench results directories in place (samples.jsonl scores "
                             "and scores.json) with each run's own task scorer")
    args = parser.parse_args(argv)
    try:
        summary = rescore(args.path) if args.write else score_path(args.path)
    except (InputError, ValueError) as err:  # ValueError: a metric refused a gold answer
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
