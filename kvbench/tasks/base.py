"""The task interface: a task yields samples (prompt parts + gold answers) and scores predictions.

Tasks are declared as data (texts and tables under ``kvbench/task_data/``, run parameters in
``kvbench/conf/task/``) plus a small class here and scorer functions in ``kvbench.scoring``. Generation
never scores: results store predictions, and scoring reads them, so scores can be recomputed without a
model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import yaml

from kvbench.errors import DataError
from kvbench.params import param, parse_params
from kvbench.results import SampleRecord, read_jsonl_strict

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: task texts and tables, shipped as package data (``kvbench/task_data/``)
TASK_DATA = resources.files("kvbench") / "task_data"


def task_yaml(kind: str, name: str) -> Any:
    """A task's texts or table shipped in ``kvbench/task_data/<kind>/<name>`` (YAML)."""
    with open(TASK_DATA / kind / name) as f:
        return yaml.safe_load(f)


COMPRESS_MODES = ("whole", "context")


def context_cluster(context: str) -> str:
    """``Sample.cluster`` of a sample asking about ``context``: a hash of the text, so the samples of
    one data file that share a context get one key and every other sample its own."""
    return "context-" + hashlib.sha256(context.encode()).hexdigest()[:16]


def location(default: Any = None) -> Any:
    """A parameter field that says where the task's data is, not what it is: left out of the run
    identity (``Task.describe``), where the data is identified by ``Task.data_fingerprint``."""
    return param(default, location=True)


def compress_mode(default: str = "whole") -> Any:
    """The ``compress`` parameter every task has (``whole`` or ``context``, see ``Sample``)."""
    return param(default, choices=COMPRESS_MODES)


def files_fingerprint(folder: str | Path, names: list[str]) -> dict[str, Any]:
    """``Task.data_fingerprint`` of data files: the SHA-256 of each, by its name in its folder."""
    return {"sha256": {name: hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest() for name in names}}


@dataclass(frozen=True)
class TaskGroup:
    """A group of tasks the report also averages over (LongBench: a category)."""

    #: what the groups are, e.g. "LongBench category"
    kind: str
    name: str
    #: the group's place among the groups of its kind (report order)
    rank: int

    @property
    def title(self) -> str:
        return f"{self.kind}: {self.name}"


class ReportRun(NamedTuple):
    """A complete run as a task kind's report tables (``Task.tables``) see it."""

    #: the leaderboard's row and column labels: method (with non-default parameters) and setting
    method: str
    setting: str
    #: the task's name (a suite's subtask: ``ruler/vt``)
    task: str
    #: the run's scores.json ``metrics`` (``Task.summarize``)
    metrics: dict[str, Any]


class TaskTable(NamedTuple):
    """A table of a task kind's own in the report: a caption, column names and rows of cells."""

    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Sample:
    """One prompt. ``context + question`` is the prompt text before any chat template.

    With compress mode ``whole`` the whole prompt is prefilled and compressed; with ``context`` the
    context is prefilled and compressed and the question is appended uncompressed afterwards.
    """

    id: str
    context: str
    question: str
    answers: list[str]
    max_new_tokens: int
    chat_template: bool = False
    #: stop generating once the new text contains one of these
    stop_strings: list[str] = field(default_factory=list)
    #: texts whose (last) token id also ends generation, like EOS (LongBench's samsum: "\n")
    stop_tokens: list[str] = field(default_factory=list)
    #: EOS and stop tokens are not allowed before this many new tokens
    min_new_tokens: int = 0
    #: text fed after the generation stops, as if generated, before up to ``followup_new_tokens``
    #: more tokens: a question asked after a long generation (``kvbench.generation.generate``)
    followup: str = ""
    followup_new_tokens: int = 0
    #: task-specific facts stored with the prediction and used by scoring (length, depth, classes...)
    meta: dict[str, Any] = field(default_factory=dict)
    #: the key shared by the samples that ask about one context (:func:`context_cluster`), so that
    #: intervals and paired tests resample contexts, not questions; None: the sample is its own
    cluster: str | None = None


class Task:
    """A task family (``kind`` in a ``task/`` config); an instance is one configured task.

    ``name`` (from the config) names the results directory. ``Params`` is the dataclass of run
    parameters whose defaults match its ``task/`` config (``kvbench/conf/task/<name>.yaml``, or
    generated by ``store_configs``).
    """

    kind: ClassVar[str]
    Params: ClassVar[type]
    #: the metric reported as the task's score
    main_metric: ClassVar[str]

    def __init__(self, name: str, params: Any):
        self.name = name
        self.params = params

    @classmethod
    def parse_params(cls, values: dict[str, Any]) -> Any:
        """``Params`` from a config mapping: every value checked against its declared type and bounds
        (``kvbench.params``, messages ``passkey.key_digits=0: expected an integer >= 1``), then by the
        parameters' own ``validate()`` (checks that involve several, or the task's tables)."""
        params = parse_params(cls.kind, cls.Params, values, noun="task parameter")
        validate = getattr(params, "validate", None)
        if validate is not None:
            validate()
        return params

    def subtasks(self) -> list["Task"]:
        """The tasks that get a results directory each (a suite such as LongBench has many)."""
        return [self]

    def samples(self, tokenizer, model_cfg) -> list[Sample]:
        raise NotImplementedError

    def score(self, record: SampleRecord) -> dict[str, float]:
        """Scores of one result record (``pred``, ``answers``, ``meta``), by metric name."""
        raise NotImplementedError

    def score_record(self, record: SampleRecord) -> dict[str, float]:
        """A record's scores: those of its prediction, or with n sampled completions, each
        completion's (set on it) and their means per metric (pass@1 averaged over the n samples)."""
        if not record.completions:
            return self.score(record)
        for c in record.completions:
            c.scores = self.score(dataclasses.replace(record, pred=c.pred, new_tokens=c.new_tokens,
                                                      stopped_by=c.stopped_by, completions=[]))
        metrics = record.completions[0].scores
        return {m: sum(c.scores[m] for c in record.completions) / len(record.completions) for m in metrics}

    def summarize(self, records: list[SampleRecord]) -> dict[str, Any]:
        """Task-level scores: the mean of every metric over records, x100, rounded to 2 places."""
        metrics = sorted({m for r in records for m in r.scores})
        return {m: round(100 * sum(r.scores[m] for r in records) / len(records), 2) for m in metrics} if records else {}

    def describe(self) -> dict[str, Any]:
        """The task in the run identity: its parameters without data locations (``location``)."""
        locations = {f.name for f in dataclasses.fields(self.params) if f.metadata.get("location")}
        params = {k: v for k, v in dataclasses.asdict(self.params).items() if k not in locations}
        return {"name": self.name, "kind": self.kind, "params": params}

    def data_fingerprint(self) -> dict[str, Any] | None:
        """A content hash of the data files this task reads (None: it reads none)."""
        return None

    def check_data(self) -> None:
        """Read and check the local data files this task reads (a ``DataError`` naming the file and
        line, or the file and sample id), so bad data fails before the model loads. Hub data is
        checked when it is loaded."""

    def groups(self) -> list[TaskGroup]:
        """The groups of tasks this task's scores are also averaged in, in reports."""
        return []

    def figures(self, metrics: dict[str, Any], title: str) -> dict[str, "Figure"]:
        """This task's own figures of one run, from its scores.json ``metrics``, by name."""
        return {}

    @classmethod
    def tables(cls, runs: list[ReportRun]) -> dict[str, TaskTable]:
        """This task kind's own tables over one model's complete runs of it (in leaderboard order),
        by title; the report adds them to the model's page (RULER: its per-length table)."""
        return {}

    @classmethod
    def store_configs(cls, config_store) -> None:
        """Register configs generated from the task's tables in Hydra's ConfigStore (``task=...``)."""

    @classmethod
    def from_identity(cls, description: dict[str, Any]) -> "Task":
        """The task of a ``describe()`` recorded in run.json, without validating it again (so a run
        can be re-scored or reported where its data is not available)."""
        return cls(description["name"], cls.Params(**description["params"]))


def require_fields(row: Any, where: str, fields: dict[str, type | tuple[type, ...]],
                   error: type[Exception] = DataError) -> dict:
    """``row`` if it is an object holding ``fields`` with their official types (a bool is no int);
    otherwise ``error`` naming ``where`` (file and line, or hub row) and the field."""
    if not isinstance(row, dict):
        raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name, kind in fields.items():
        if name not in row:
            raise error(f"{where}: missing field '{name}'")
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(row[name], kinds) or (isinstance(row[name], bool) and bool not in kinds):
            raise error(f"{where}: field '{name}' has type {type(row[name]).__name__}")
    return row


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(``file:line``, object) for every non-blank line of a task's JSONL data file; a line that is
    not UTF-8 or not JSON raises a DataError naming the file and line."""
    return read_jsonl_strict(Path(path), DataError)


def read_json(path: str | Path) -> Any:
    """A task's JSON data file; a DataError naming the file and line where it is not UTF-8 or not
    JSON."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = 1 + raw.count(b"\n", 0, err.start)
        raise DataError(f"{path}:{line}: not UTF-8 text ({err.reason}: byte 0x{raw[err.start]:02x})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None


def unique_ids(rows: Iterable[tuple[str, str]], source: str) -> None:
    """A DataError naming both places of the first id given twice; ``rows`` is (where, id) pairs."""
    seen: dict[str, str] = {}
    for where, sample_id in rows:
        if sample_id in seen:
            raise DataError(f"{where}: duplicate sample id {sample_id!r} in {source} (first at {seen[sample_id]})")
        seen[sample_id] = where
