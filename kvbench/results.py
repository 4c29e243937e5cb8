"""Results directories: one per (model, task, method, setting), written as samples finish.

Layout (see docs/architecture.md)::

    <results_dir>/<model>/<task>/<method>/<setting>/
        samples.jsonl   one JSON object per finished sample, appended as it finishes
        run.json        resolved config, versions, device, method and task description, progress
        scores.json     task-level scores, rewritten from samples.jsonl at the end of a run

A record is appended with a single ``write`` on an ``O_APPEND`` descriptor and fsync'd, so a killed
run loses at most the sample in flight, and a torn last line (killed mid-write) is skipped on reading
and never glued to the next record. Reading de-duplicates by sample id (first record wins), so a
resumed run never counts a sample twice.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"
RUN = "run.json"
SCORES = "scores.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every well-formed line; torn or corrupt lines are skipped loudly."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                log.warning("%s:%d: skipping a torn or corrupt line (a run killed mid-write?)", path, number)
                continue
            yield number, obj


class RunDir:
    """The results directory of one configuration."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.samples_path = self.path / SAMPLES

    def records(self) -> list[dict]:
        """Finished samples, de-duplicated by id, in the order they were first written."""
        if not self.samples_path.exists():
            return []
        seen: dict[str, dict] = {}
        for _, obj in iter_jsonl(self.samples_path):
            seen.setdefault(obj["id"], obj)
        return list(seen.values())

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True, default=str).encode() + b"\n"
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.samples_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A torn last line from a killed run must not swallow this record: start on a new line.
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_run(self) -> dict | None:
        path = self.path / RUN
        return read_json(path) if path.exists() else None

    def write_run(self, meta: dict) -> None:
        write_json_atomic(self.path / RUN, meta)

    def read_scores(self) -> dict | None:
        path = self.path / SCORES
        return read_json(path) if path.exists() else None

    def write_scores(self, scores: dict) -> None:
        write_json_atomic(self.path / SCORES, scores)


def find_runs(results_dir: Path) -> list[RunDir]:
    """Every results directory under ``results_dir`` (those with a run.json), sorted by path."""
    return [RunDir(p.parent) for p in sorted(Path(results_dir).rglob(RUN))]
