"""Results directories: one per (model, task, method, setting), written as samples finish.

Layout (see docs/architecture.md)::

    <results_dir>/<model>/<task>/<method>/<setting>/
        samples.jsonl   one JSON object per finished sample, appended as it finishes
        run.json        resolved config, versions, device, method and task description, progress
        scores.json     task-level scores, recomputed from samples.jsonl at the end of every job

A record is appended with a single ``write`` on an ``O_APPEND`` descriptor and fsync'd, so a killed
run loses at most the sample in flight, and a torn last line (killed mid-write) is skipped on reading
and never glued to the next record. Reading de-duplicates by sample id (first record wins), so a
resumed run never counts a sample twice.

Any number of processes, on any number of nodes, may write one directory at once (the shards of a
configuration, a requeued job, the same configuration started twice). ``O_APPEND`` alone is atomic
only on local filesystems (NFS clients compute the offset themselves), so appends and the
read-modify-write of run.json/scores.json also hold an advisory ``flock`` on ``.lock`` (honoured
across NFS clients). Samples are claimed with ``flock`` too (``.claims/``), so that two jobs do not
generate the same sample; the kernel (or the NFS server) drops a dead job's locks, so a killed job
leaves nothing to clean up.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"
RUN = "run.json"
SCORES = "scores.json"
LOCK = ".lock"
CLAIMS = ".claims"

# errnos of filesystems that do not implement flock (e.g. Lustre mounted without -o flock)
_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}


def _flock(fd: int, operation: int) -> None:
    """``flock(fd, operation)``, a no-op where the filesystem has no flock: there appends are still
    single O_APPEND writes and reading still de-duplicates, but no sample is ever refused to a claimant
    (at worst two jobs generate the same sample). Raises BlockingIOError for a held LOCK_NB lock."""
    try:
        fcntl.flock(fd, operation)
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        _warn_no_flock(e.strerror)


@functools.cache
def _warn_no_flock(reason: str) -> None:
    log.warning("this filesystem does not support flock (%s): results are written without locks", reason)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def record_line(record: dict) -> str:
    """A record as one ``samples.jsonl`` line (the only format records are written in)."""
    return json.dumps(record, sort_keys=True, default=str) + "\n"


def read_jsonl_strict(path: Path, error: type[Exception]) -> Iterator[tuple[str, Any]]:
    """(``file:line``, object) for every non-blank line of an input file; a malformed line raises
    ``error`` naming its file and line number (input data must be whole, unlike results)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: malformed JSON line: {err}") from None


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
        """Finished samples, de-duplicated by id, in the order they were first written. Reads without
        the lock (a record being appended right now may be missing); take :meth:`lock` for a snapshot
        that must hold every record written so far."""
        if not self.samples_path.exists():
            return []
        seen: dict[str, dict] = {}
        for _, obj in iter_jsonl(self.samples_path):
            seen.setdefault(obj["id"], obj)
        return list(seen.values())

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's exclusive lock: around appends, and around reading samples.jsonl and
        rewriting run.json/scores.json from it. Not re-entrant: do not call :meth:`append` inside."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def claim(self, sample_id: str) -> Iterator[bool]:
        """Try to take ``sample_id`` for this process: yields False while another live process holds it.

        The claim is a flock, so it dies with its holder (SIGKILL, node loss) and a requeued job takes
        the sample again. The holder finds the record already written if another job finished the
        sample in between; check that before generating. The file is removed once the body has
        returned, i.e. after the record was appended: a job that then claims a fresh file finds the
        record.
        """
        path = self.path / CLAIMS / f"{hashlib.sha1(sample_id.encode()).hexdigest()}.lock"  # ids may hold "/"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                claimed = True
            except BlockingIOError:
                claimed = False
            yield claimed
            if claimed:
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def append(self, record: dict) -> None:
        line = record_line(record).encode()
        with self.lock():
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
