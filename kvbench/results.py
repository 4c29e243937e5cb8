"""Results directories: one per (model, task, method, setting), written as samples finish.

Layout (see docs/architecture.md)::

    <results_dir>/<model>/<task>/<method>/<setting>/
        samples.jsonl   one JSON object per finished sample, appended as it finishes (SampleRecord)
        run.json        identity, resolved config, versions, device, progress (RunInfo)
        scores.json     task-level scores, recomputed from samples.jsonl at the end of every job (RunScores)

Every file carries ``schema_version`` (:data:`SCHEMA_VERSION`). Files without one were written before
versions existed (version 0); they are read as well and brought to the current schema in memory
(records and scores have the same fields in both; for identities see :meth:`RunIdentity.from_json`).

A record is appended with a single ``write`` on an ``O_APPEND`` descriptor and fsync'd, so a killed
run loses at most the sample in flight, and a torn line (killed mid-write) is never glued to the next
record. One reader, :func:`read_samples`, serves resuming, scoring and reporting alike:

* records are de-duplicated by sample id, the first record of an id wins (a later one is a second
  job's copy of the same sample), with one warning per file naming the ids;
* a torn line, one cut short by a killed write (its JSON object still open where the line ends),
  is skipped with one warning: it never held a whole record;
* any other unreadable line (not UTF-8, malformed JSON) is corrupt: it is skipped with a warning
  naming ``file:line`` and listed in :attr:`Samples.corrupt`, so that rewriting a samples.jsonl
  (``python -m kvbench.score --write``) refuses instead of dropping it;
* a well-formed line that is not a record (a newer schema, missing keys) raises :class:`SchemaError`.

Any number of processes, on any number of nodes, may write one directory at once (the shards of a
configuration, a requeued job, the same configuration started twice). ``O_APPEND`` alone is atomic
only on local filesystems (NFS clients compute the offset themselves), so appends and the
read-modify-write of run.json/scores.json also hold an advisory ``flock`` on ``.lock`` (honoured
across NFS clients). Samples are claimed with ``flock`` too (``.claims/``), so that two jobs do not
generate the same sample; the kernel (or the NFS server) drops a dead job's locks, so a killed job
leaves nothing to clean up.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterator

from kvbench.decoding import Decoding
from kvbench.stats import mean_ci

log = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"
RUN = "run.json"
SCORES = "scores.json"
LOCK = ".lock"
CLAIMS = ".claims"

#: the layout of samples.jsonl records, run.json and scores.json written by this code
SCHEMA_VERSION = 1
#: the task parameters naming local folders that schema 0 kept in the identity (LongBench's and
#: RULER's data folders): a fixed fact of that schema, whatever tasks exist now
V0_LOCATIONS = ("data_dir", "kvpress_dir")

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
    """Write ``text`` to ``path`` through a temporary file and rename: readers never see half a file.
    The file gets the permissions the umask allows, as ``open`` gives (``tempfile.mkstemp`` would
    make it private to its owner)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
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
    """(``file:line``, object) for every non-blank line of an input file; a line that is not UTF-8
    or not JSON raises ``error`` naming its file and line number (input data must be whole, unlike
    results)."""
    with open(path, "rb") as f:  # decoded line by line, so an encoding error has its line number
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(f"{where}: not UTF-8 text ({err.reason}: byte 0x{raw[err.start]:02x})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: malformed JSON line: {err}") from None


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _cut_short(text: str) -> bool:
    """Whether ``text`` ends inside an open JSON string, object or array: a write cut short."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
    return in_string or depth > 0


# ---------------------------------------------------------------------------------------------
# The files' contents
# ---------------------------------------------------------------------------------------------


class SchemaError(ValueError):
    """A results file this code cannot read (written by a newer kvbench, or not a kvbench file)."""


def _version(obj: Any, what: str) -> int:
    """The schema version of a parsed file (0: written before versions existed)."""
    if not isinstance(obj, dict):
        raise SchemaError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version", 0)
    if not isinstance(version, int) or not 0 <= version <= SCHEMA_VERSION:
        raise SchemaError(f"{what}: schema_version {version!r} is not one this kvbench reads "
                          f"(0 to {SCHEMA_VERSION}; a newer kvbench writes higher ones)")
    return version


def _build(cls: type, values: dict, what: str):
    """``cls(**values)``, naming the missing or unexpected keys instead of a TypeError."""
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(values) - names), sorted(required - set(values))
    if unknown or missing:
        raise SchemaError(f"{what}: not a {cls.__name__} (missing {missing}, unexpected {unknown})")
    return cls(**values)


@dataclass
class KVStats:
    """The cache after one step (``KVCache.stats()``): what it holds and what the full cache would."""

    bytes_full: int
    bytes_held: int
    #: bytes_full / bytes_held
    ratio: float
    #: mean over layers and KV heads
    tokens_held: float
    tokens_per_layer: list[float]


@dataclass
class HeldCurve:
    """The cache held over a generation, after each step's compression: after ``steps[i]`` generated
    tokens were fed back, the compressed layers' most loaded KV head held ``tokens[i]`` tokens and
    the whole cache ``bytes[i]`` bytes. A point every ``every`` steps, plus the first (after
    prefill, step 0) and the last (the end)."""

    every: int
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)

    def add(self, step: int, tokens: int, nbytes: int) -> None:
        self.steps.append(step)
        self.tokens.append(tokens)
        self.bytes.append(nbytes)


@dataclass
class KVUsage:
    after_prefill: KVStats
    at_end: KVStats
    #: most bytes held between steps (after each step's compression)
    peak_bytes_held: int
    #: most bytes held inside a step (before its compression)
    peak_bytes_in_step: int
    #: most tokens a compressed layer's KV head held between steps (None: recorded before it was)
    peak_tokens_held: int | None = None
    curve: HeldCurve | None = None
    #: mean bytes a decoding step read from the cache (less than held for Quest; None: no decoding
    #: step, or recorded before this was)
    decode_bytes_read: float | None = None


@dataclass
class Completion:
    """One of a record's ``decoding.n`` sampled generations (the record's own fields are the first's)."""

    seed: int
    pred: str
    new_tokens: int
    stopped_by: str
    prefill_s: float
    decode_s: float
    peak_tokens_held: int
    #: metric -> 0..1, by the task's scorer
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class Fidelity:
    """How close the compressed cache's next-token distributions stay to the full cache's,
    teacher-forced over a continuation's tokens (the gold answer, or the full cache's greedy output:
    ``kvbench.fidelity``): means over those tokens."""

    #: KL(full || compressed) in nats
    kl: float
    #: the continuation's negative log-likelihood per token, compressed minus full, in nats
    nll_delta: float
    #: share of tokens where both caches' most likely next token is the same
    top1_agreement: float
    #: the continuation's tokens
    tokens: int


#: the per-sample fidelity metrics summarised in scores.json
FIDELITY_METRICS = ("kl", "nll_delta", "top1_agreement")
#: what fidelity is teacher-forced over -> the record's (and scores.json's) field holding it
FIDELITY_FIELDS = {"gold": "fidelity", "greedy": "fidelity_greedy"}


@dataclass
class SampleRecord:
    """One line of samples.jsonl: a finished sample's prediction, gold answers, scores and costs."""

    id: str
    #: the task's results name (a LongBench subtask's dataset, e.g. ``trec_e``)
    task: str
    pred: str
    answers: list[str]
    #: task-specific facts used by scoring (length, depth, classes...)
    meta: dict[str, Any]
    prompt_tokens: int
    #: tokens of the question appended uncompressed (compress mode ``context``), else 0
    appended_tokens: int
    new_tokens: int
    stopped_by: str
    prefill_s: float
    #: the prefill forward ran for another ratio of the sweep; prefill_s is its restore and compression
    prefill_reused: bool
    decode_s: float
    compress_s: float
    decode_compress_s: float
    kv: KVUsage
    finished_at: str
    #: metric -> 0..1, by the task's scorer (``Task.score``); with n samples, the mean over them
    scores: dict[str, float] = field(default_factory=dict)
    #: the n sampled generations, each scored (empty for one generation: the record is it)
    completions: list[Completion] = field(default_factory=list)
    #: the compressed cache against the full cache over the gold answer; None for the full method,
    #: without a gold answer, with a chunked prefill, with ``fidelity=false``, and in older records
    fidelity: Fidelity | None = None
    #: the same over the full cache's greedy output (decoded as the sample's generation is); None
    #: for the full method, with a chunked prefill, with ``fidelity=false``, and in older records
    fidelity_greedy: Fidelity | None = None
    #: the sample's context cluster (``kvbench.tasks.Sample.cluster``): records with one key are
    #: resampled together; None (and in older records): the record is its own cluster
    cluster: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str = "record") -> "SampleRecord":
        _version(obj, where)  # versions 0 and 1 hold the same fields
        values = dict(obj)
        kv = dict(values.get("kv") or {})
        for step in ("after_prefill", "at_end"):
            if isinstance(kv.get(step), dict):
                kv[step] = _build(KVStats, kv[step], f"{where}: kv.{step}")
        if isinstance(kv.get("curve"), dict):
            kv["curve"] = _build(HeldCurve, kv["curve"], f"{where}: kv.curve")
        values["kv"] = _build(KVUsage, kv, f"{where}: kv")
        values["completions"] = [_build(Completion, c, f"{where}: completions[{i}]") if isinstance(c, dict) else c
                                 for i, c in enumerate(values.get("completions") or [])]
        for name in FIDELITY_FIELDS.values():
            if isinstance(values.get(name), dict):
                values[name] = _build(Fidelity, values[name], f"{where}: {name}")
        return _build(cls, values, where)


@dataclass
class RunScores:
    """scores.json: the task's scores over the directory's records, completeness and measured costs."""

    task: str
    #: the metric reported as the task's score (``Task.main_metric``)
    metric: str
    score: float | None
    #: ``Task.summarize`` of the records: every metric, plus task-specific breakdowns
    metrics: dict[str, Any]
    n: int
    n_expected: int
    complete: bool
    #: means over records of the cache after prefill (None without records)
    measured_ratio: float | None
    tokens_held: float | None
    bytes_held: float | None
    peak_bytes_held: float | None
    decode_tokens_per_s: float | None
    #: 95% interval of the main metric on the scale of ``score`` (kvbench.stats.mean_ci of the
    #: records' per-sample main-metric scores, see :func:`sample_scores`, clustered by
    #: :func:`sample_clusters`; ``ci_method`` names it); None where a record lacks
    #: the metric, and in files written before intervals were recorded
    ci95: list[float] | None = None
    ci_method: str | None = None
    ci_resamples: int | None = None
    ci_seed: int | None = None
    #: per fidelity metric (:data:`FIDELITY_METRICS`): ``mean``, ``ci95`` (the interval ``ci95`` uses,
    #: on the metric's own scale) and ``n``, over the records that hold fidelity over the gold answer;
    #: None when none does
    fidelity: dict[str, dict[str, Any]] | None = None
    #: the same over the full cache's greedy output (records' ``fidelity_greedy``)
    fidelity_greedy: dict[str, dict[str, Any]] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str = SCORES) -> "RunScores":
        _version(obj, where)  # versions 0 and 1 hold the same fields
        return _build(cls, obj, where)


def sample_scores(records: list[SampleRecord], metric: str) -> dict[str, float] | None:
    """Sample id -> the record's 0..1 score under ``metric``, the unit every interval and paired test
    resamples; None when there are no records or one lacks the metric.

    The task's reported score is not always the plain mean of these (passkey averages its depth x
    length cells, RULER and LongBench round): the interval is that of the per-sample mean, which
    equals the score whenever cells hold equally many samples, as passkey's grid does."""
    if not records or any(metric not in r.scores for r in records):
        return None
    return {r.id: r.scores[metric] for r in records}


def sample_clusters(records: list[SampleRecord]) -> dict[str, Hashable] | None:
    """Sample id -> cluster key, for intervals and paired tests (``kvbench.stats``); None when no
    record has a cluster. A record without one is its own cluster (a key no other record has)."""
    if all(r.cluster is None for r in records):
        return None
    return {r.id: ("sample", r.id) if r.cluster is None else r.cluster for r in records}


def summarize_fidelity(records: list[SampleRecord], over: str = "gold") -> dict[str, dict[str, Any]] | None:
    """scores.json's ``fidelity`` (``over="gold"``) or ``fidelity_greedy`` (``"greedy"``): each
    metric's mean over the records that hold that fidelity, with its 95% interval
    (``kvbench.stats.mean_ci``, clustered as the records are; on the metric's own scale, unlike
    ``ci95``); None when none holds it."""
    measured = [r for r in records if getattr(r, FIDELITY_FIELDS[over]) is not None]
    if not measured:
        return None
    clusters = sample_clusters(measured)
    keys = [clusters[r.id] for r in measured] if clusters else None
    intervals = {name: mean_ci([getattr(getattr(r, FIDELITY_FIELDS[over]), name) for r in measured], keys)
                 for name in FIDELITY_METRICS}
    return {name: {"mean": i.estimate, "ci95": [i.low, i.high], "n": i.n} for name, i in intervals.items()}


def generations(record: SampleRecord) -> list[SampleRecord | Completion]:
    """A record's generations: its n sampled completions, or the record itself (one generation).
    Both carry ``new_tokens``, ``stopped_by``, ``prefill_s``, ``decode_s`` and ``scores``."""
    return list(record.completions) or [record]


def seconds_per_correct(records: list[SampleRecord], metric: str) -> float | None:
    """Generation time (prefill and decoding) over all generations, divided by the number of correct
    answers (the sum of their ``metric`` scores); None without a correct answer or a score."""
    outputs = [g for r in records for g in generations(r)]
    if not outputs or any(metric not in g.scores for g in outputs):
        return None
    correct = sum(g.scores[metric] for g in outputs)
    return sum(g.prefill_s + g.decode_s for g in outputs) / correct if correct else None


@dataclass
class RunIdentity:
    """What determines a directory's results, so what must match for a run to resume it.

    No prose and no local paths: tasks leave their data location out of ``task.params``, and data
    read from files is identified by ``data`` (the task's content fingerprint) instead.
    """

    #: ``ModelConfig`` fields
    model: dict[str, Any]
    #: the method's name, params and phases (:attr:`METHOD_KEYS` of ``Method.describe()``)
    method: dict[str, Any]
    #: ``Task.describe()``: name, kind, params
    task: dict[str, Any]
    #: ratio (1 for ``full``), budget, label (the setting's directory name)
    compression: dict[str, Any]
    #: ``Task.data_fingerprint()``: a content hash of the data files read; None: no such files
    data: dict[str, Any] | None = None
    #: the run's seed (``KVBenchConfig.seed``): it seeds torch and every method that draws (random)
    seed: int = 0
    #: the ``decoding`` section (``kvbench.decoding.Decoding``); files without one were greedy
    decoding: dict[str, Any] = field(default_factory=lambda: dataclasses.asdict(Decoding()))
    #: 0: read from a file written before versions existed, whose data was not fingerprinted
    schema_version: int = dataclasses.field(default=SCHEMA_VERSION, compare=False)

    #: what of a method's description determines results; anything else a method describes (e.g.
    #: quant's bits in use) follows from these and the compression, or is prose
    METHOD_KEYS = ("name", "params", "phases")

    @classmethod
    def method_of(cls, description: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in description.items() if k in cls.METHOD_KEYS}

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        del values["schema_version"]  # run.json's own version says it
        return values

    @classmethod
    def from_json(cls, obj: Any, version: int, where: str = RUN) -> "RunIdentity":
        """An identity of run.json ``version``. Version 0 is brought to version 1's meaning: it
        held the whole method description (with a sentence on sliding-window layers) and the
        task's data folders (:data:`V0_LOCATIONS`): prose and local paths, which determine nothing;
        and no data fingerprint."""
        if not isinstance(obj, dict):
            raise SchemaError(f"{where}: identity must be a JSON object")
        values = dict(obj)
        if isinstance(values.get("model"), dict):  # model configs before chat-template variables had none
            values["model"] = {"chat_template_kwargs": {}, **values["model"]}
        if version == 0:
            values["method"] = cls.method_of(values["method"])
            task = dict(values["task"])
            task["params"] = {k: v for k, v in task["params"].items() if k not in V0_LOCATIONS}
            values["task"] = task
        return _build(cls, {**values, "schema_version": version}, f"{where}: identity")

    def differences(self, previous: "RunIdentity") -> list[str]:
        """The keys in which ``previous`` (a directory's identity) differs from this one. A
        version-0 identity recorded no data fingerprint, so its data cannot be compared."""
        names = [f.name for f in dataclasses.fields(self) if f.compare]
        if previous.schema_version == 0:
            names.remove("data")
        return [name for name in names if getattr(self, name) != getattr(previous, name)]


@dataclass
class RunInfo:
    """run.json: the identity, the resolved config and where and how the run ran."""

    identity: RunIdentity
    #: the resolved ``KVBenchConfig`` the job ran
    config: dict[str, Any]
    model_info: dict[str, Any]
    versions: dict[str, str]
    git_commit: str | None
    host: str
    n_expected: int
    #: running, complete, partial (this job ended, others owe samples) or interrupted (stopped by a signal)
    status: str
    started: str | None = None
    finished: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "identity": self.identity.to_json()}

    @classmethod
    def from_json(cls, obj: Any, where: str = RUN) -> "RunInfo":
        version = _version(obj, where)
        values = dict(obj)
        identity, config = values.get("identity"), values.get("config")
        if isinstance(identity, dict) and "seed" not in identity and isinstance(config, dict):
            # identities written before the seed was part of them: the seed the run was configured with
            identity = {**identity, "seed": config.get("seed", 0)}
        values["identity"] = RunIdentity.from_json(identity, version, where)
        return _build(cls, values, where)


@dataclass
class Samples:
    """What :func:`read_samples` found in one samples.jsonl."""

    #: one record per sample id (the first written), in the order they were first written
    records: list[SampleRecord]
    #: ids that had more than one record (the later ones were ignored)
    duplicates: list[str]
    #: ``file:line`` of the lines cut short by a killed write (skipped)
    torn: list[str]
    #: ``file:line: why`` of the other unreadable lines (skipped, but never to be dropped by a rewrite)
    corrupt: list[str]


def read_samples(path: Path, warn: bool = True) -> Samples:
    """Read a samples.jsonl by the rules of the module docstring; a missing file holds nothing.
    ``warn``: log what was skipped (one warning per kind and file)."""
    seen: dict[str, SampleRecord] = {}
    duplicates, torn, corrupt = [], [], []
    if Path(path).exists():
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path}:{number}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    corrupt.append(f"{where}: not UTF-8 text ({err.reason}: byte 0x{raw[err.start]:02x})")
                    continue
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    if _cut_short(text):
                        torn.append(where)
                    else:
                        corrupt.append(f"{where}: malformed JSON ({err.msg} at column {err.colno})")
                    continue
                record = SampleRecord.from_json(obj, where)
                if record.id in seen:
                    duplicates.append(record.id)
                else:
                    seen[record.id] = record
    if warn:
        if torn:
            log.warning("skipping %d line(s) cut short by a killed write: %s", len(torn), ", ".join(torn))
        for problem in corrupt:
            log.warning("skipping a corrupt line: %s", problem)
        if duplicates:
            log.warning("%s: %d duplicate record(s) ignored, the first record of each id kept: %s",
                        path, len(duplicates), ", ".join(sorted(set(duplicates))))
    return Samples(list(seen.values()), duplicates, torn, corrupt)


class RunDir:
    """The results directory of one configuration."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.samples_path = self.path / SAMPLES

    def read_samples(self, warn: bool = True) -> Samples:
        """:func:`read_samples` of this directory's samples.jsonl. Reads without the lock (a record
        being appended right now may be missing); take :meth:`lock` for a snapshot that must hold
        every record written so far."""
        return read_samples(self.samples_path, warn)

    def records(self, warn: bool = True) -> list[SampleRecord]:
        """Finished samples, de-duplicated by id, in the order they were first written (:meth:`read_samples`)."""
        return self.read_samples(warn).records

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

    def append(self, record: SampleRecord) -> None:
        line = record_line(record.to_json()).encode()
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

    def read_run(self) -> RunInfo | None:
        path = self.path / RUN
        return RunInfo.from_json(read_json(path), str(path)) if path.exists() else None

    def write_run(self, info: RunInfo) -> None:
        write_json_atomic(self.path / RUN, info.to_json())

    def read_scores(self) -> RunScores | None:
        path = self.path / SCORES
        return RunScores.from_json(read_json(path), str(path)) if path.exists() else None

    def write_scores(self, scores: RunScores) -> None:
        write_json_atomic(self.path / SCORES, scores.to_json())


def find_runs(results_dir: Path) -> list[RunDir]:
    """Every results directory under ``results_dir`` (those with a run.json), sorted by path."""
    return [RunDir(p.parent) for p in sorted(Path(results_dir).rglob(RUN))]
