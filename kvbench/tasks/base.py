"""The task interface: a task yields samples (prompt parts + gold answers) and scores predictions.

Tasks are declared as data (texts and tables under ``kvbench/task_data/``, run parameters in
``kvbench/conf/task/``) plus a small class here and scorer functions in ``kvbench.scoring``. Generation
never scores: results store predictions, and scoring reads them, so scores can be recomputed without a
model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kvbench.errors import ConfigError
from kvbench.registry import unknown_name
from kvbench.results import SampleRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: task texts and tables, shipped as package data (``kvbench/task_data/``)
TASK_DATA = resources.files("kvbench") / "task_data"

COMPRESS_MODES = ("whole", "context")


def location(default: Any = None) -> Any:
    """A parameter field that says where the task's data is, not what it is: left out of the run
    identity (``Task.describe``), where the data is identified by ``Task.data_fingerprint``."""
    return field(default=default, metadata={"location": True})


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
    #: task-specific facts stored with the prediction and used by scoring (length, depth, classes...)
    meta: dict[str, Any] = field(default_factory=dict)


class Task:
    """A task family (``kind`` in ``conf/task/*.yaml``); an instance is one configured task.

    ``name`` (from the config) names the results directory. ``Params`` is the dataclass of run
    parameters whose defaults match ``conf/task/<name>.yaml``.
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
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise unknown_name(f"{cls.kind} task parameter", unknown[0], fields)
        params = cls.Params(**values)
        if getattr(params, "compress", "whole") not in COMPRESS_MODES:
            raise ConfigError(f"task compress mode must be one of {COMPRESS_MODES}, got '{params.compress}'")
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

    def groups(self) -> list[TaskGroup]:
        """The groups of tasks this task's scores are also averaged in, in reports."""
        return []

    def figures(self, metrics: dict[str, Any], title: str) -> dict[str, "Figure"]:
        """This task's own figures of one run, from its scores.json ``metrics``, by name."""
        return {}

    @classmethod
    def store_configs(cls, config_store) -> None:
        """Register configs generated from the task's tables in Hydra's ConfigStore (``task=...``)."""

    @classmethod
    def from_identity(cls, description: dict[str, Any]) -> "Task":
        """The task of a ``describe()`` recorded in run.json, without validating it again (so a run
        can be re-scored or reported where its data is not available)."""
        return cls(description["name"], cls.Params(**description["params"]))
