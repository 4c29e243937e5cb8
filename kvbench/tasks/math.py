r"""Math reasoning with long generations: MATH-500, AIME 2025 and GSM8K (``task=math500|aime25|gsm8k``).

Each problem is one chat message, the problem followed by the instruction of the reasoning papers
(DeepSeek-R1, Qwen2.5-Math): ``{problem}\nPlease reason step by step, and put your final answer
within \boxed{}.`` The runner applies the model's chat template. Generation runs up to
``max_new_tokens`` (4096 by default; reasoning models need more, e.g. ``task.max_new_tokens=32768``)
or EOS. The whole message is the prompt's context, so ``compress=context`` compresses it
and appends only the chat template's closing tokens (the assistant header) uncompressed.

Scores per sample (:mod:`kvbench.scoring.math`): ``accuracy`` (1 if the extracted final answer is
equivalent to the gold one) and ``boxed`` (1 if the prediction has a complete box). The runner
also records ``new_tokens`` and ``stopped_by``; the summary adds ``truncated``, the percentage of
samples cut off by ``max_new_tokens``, and ``mean_new_tokens``.

Data: the hub (needs network access), or a local folder, ``task.data_dir``, holding the dataset's
files as published (the top-level ``data_dir`` does not apply: MATH-500's and GSM8K's files have
the same name):

=========  ==========================================  ==========================================
task       hub dataset (config, split)                 files in data_dir, one JSON object a line
=========  ==========================================  ==========================================
math500    HuggingFaceH4/MATH-500 (test)               ``test.jsonl``: problem, solution, answer,
                                                       subject, level, unique_id
aime25     opencompass/AIME2025 (AIME2025-I and        ``aime2025-I.jsonl``, ``aime2025-II.jsonl``:
           AIME2025-II, test), the 30 problems         question, answer
gsm8k      openai/gsm8k (main, test)                   ``test.jsonl`` (the grade-school-math
                                                       release): question, answer ending in
                                                       ``#### N``
=========  ==========================================  ==========================================

AIME 2025: opencompass/AIME2025 is the set the common harnesses load (OpenCompass, evalscope);
its rows carry no id, so a sample's id is its part and row number (``AIME2025-II-3``). GSM8K's
ids are row numbers (``test-0``); MATH-500's are its ``unique_id``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from kvbench.errors import ConfigError, DataError
from kvbench.params import param
from kvbench.results import SampleRecord
from kvbench.scoring.math import equivalent, extract, gsm8k_gold, last_boxed
from kvbench.tasks import register
from kvbench.tasks.base import (Sample, Task, compress_mode, files_fingerprint, location, read_jsonl, require_fields,
                                unique_ids)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class MathParams:
    #: folder of the dataset's published files (table in the module doc); null = the hub dataset
    data_dir: str | None = location()
    max_new_tokens: int = param(4096, ge=1)
    #: whole: the prompt is prefilled and compressed; context: the assistant header is appended after
    compress: str = compress_mode()


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    meta: dict[str, Any]


def _math500(row: Any, part: str, index: int, where: str) -> Problem:
    row = require_fields(row, where, {"problem": str, "answer": str, "subject": str, "level": int, "unique_id": str})
    return Problem(row["unique_id"], row["problem"], row["answer"],
                   {"subject": row["subject"], "level": row["level"], "unique_id": row["unique_id"]})


def _aime25(row: Any, part: str, index: int, where: str) -> Problem:
    row = require_fields(row, where, {"question": str, "answer": (str, int)})
    return Problem(f"{part}-{index + 1}", row["question"], str(row["answer"]).strip(), {"part": part})


def _gsm8k(row: Any, part: str, index: int, where: str) -> Problem:
    row = require_fields(row, where, {"question": str, "answer": str})
    try:
        gold = gsm8k_gold(row["answer"])
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None
    return Problem(f"test-{index}", row["question"], gold, {})


@dataclass(frozen=True)
class Dataset:
    """Where a task's problems come from and how a row becomes a :class:`Problem`."""

    hub: str
    #: (hub config or None, local file name), in sample order
    parts: tuple[tuple[str | None, str], ...]
    read: Callable[[Any, str, int, str], Problem]
    #: GSM8K's solutions have no box: an unboxed prediction's last number is its answer
    last_number_fallback: bool = False

    def files(self, data_dir: str | Path, task: str) -> list[Path]:
        """The dataset's files in a local folder; a ConfigError naming the task and the missing file."""
        folder = Path(data_dir)
        names = ", ".join(name for _, name in self.parts)
        if not folder.is_dir():
            raise ConfigError(f"task {task}: data folder {folder} does not exist; it must hold {names} "
                              f"(the files of {self.hub}), or set task.data_dir=null to use the hub")
        paths = [folder / name for _, name in self.parts]
        for path in paths:
            if not path.is_file():
                raise ConfigError(f"task {task}: data file {path} not found; {folder} must hold {names} "
                                  f"(the files of {self.hub}), or set task.data_dir=null to use the hub")
        return paths

    def load(self, data_dir: str | None, task: str) -> list[Problem]:
        """Every problem, from the local folder or the hub; never empty."""
        if data_dir is not None:
            self.files(data_dir, task)
        problems: list[Problem] = []
        places: list[str] = []  # each problem's file and line, or hub row
        for config, name in self.parts:
            part = config or Path(name).stem
            if data_dir is not None:
                rows = list(read_jsonl(Path(data_dir) / name))
            else:
                rows = [(f"{self.hub} {part} row {i}", dict(row)) for i, row in enumerate(self._hub_rows(config, task))]
            for i, (where, row) in enumerate(rows):
                problems.append(self.read(row, part, i, where))
                places.append(where)
        source = str(data_dir) if data_dir is not None else self.hub
        if not problems:
            raise DataError(f"task {task}: {source} has no problems")
        unique_ids(zip(places, (p.id for p in problems)), source)
        return problems

    def _hub_rows(self, config: str | None, task: str):
        try:
            from datasets import load_dataset

            return load_dataset(self.hub, config, split="test")
        except Exception as err:  # offline, dataset moved, a datasets version that cannot read it...
            names = ", ".join(name for _, name in self.parts)
            raise ConfigError(
                f"task {task}: could not load {self.hub}" + (f" ({config})" if config else "")
                + f" from the Hugging Face hub: {type(err).__name__}: {err}. Without hub access, put "
                f"{names} (the files of {self.hub}) in a folder and pass task.data_dir=<folder>"
            ) from err


DATASETS = {
    "math500": Dataset("HuggingFaceH4/MATH-500", ((None, "test.jsonl"),), _math500),
    "aime25": Dataset("opencompass/AIME2025",
                      (("AIME2025-I", "aime2025-I.jsonl"), ("AIME2025-II", "aime2025-II.jsonl")), _aime25),
    "gsm8k": Dataset("openai/gsm8k", (("main", "test.jsonl"),), _gsm8k, last_number_fallback=True),
}


def prompt(problem: str) -> str:
    """The user message: the problem, then the step-by-step and boxed-answer instruction."""
    return f"{problem}\n{INSTRUCTION}"


class MathTask(Task):
    """A final-answer math task; subclasses name their dataset (module doc)."""

    Params = MathParams
    main_metric = "accuracy"
    dataset: ClassVar[Dataset]

    @classmethod
    def store_configs(cls, config_store) -> None:
        """``task=<kind>`` from the parameter defaults (every parameter present, so each can be
        overridden)."""
        config_store.store(group="task", name=cls.kind, node={"name": cls.kind, "kind": cls.kind, **asdict(MathParams())})

    @classmethod
    def parse_params(cls, values: dict[str, Any]) -> MathParams:
        params = super().parse_params(values)
        if params.data_dir is not None:
            cls.dataset.files(params.data_dir, cls.kind)  # fail before the model loads
        return params

    def samples(self, tokenizer, model_cfg) -> list[Sample]:
        return [self.build_sample(p) for p in self.dataset.load(self.params.data_dir, self.kind)]

    def build_sample(self, problem: Problem) -> Sample:
        return Sample(id=problem.id, context=prompt(problem.problem), question="", answers=[problem.answer],
                      max_new_tokens=self.params.max_new_tokens, chat_template=True, meta=problem.meta)

    def score(self, record: SampleRecord) -> dict[str, float]:
        pred = record.pred
        answer = extract(pred, self.dataset.last_number_fallback)
        return {"accuracy": float(equivalent(answer, record.answers[0])),
                "boxed": float(last_boxed(pred) is not None)}

    def summarize(self, records: list[SampleRecord]) -> dict[str, Any]:
        """Mean accuracy and boxed rate x100, plus the truncated percentage and mean new tokens."""
        summary = super().summarize(records)
        if records:
            cut = sum(r.stopped_by == "max_new_tokens" for r in records)
            summary["truncated"] = round(100 * cut / len(records), 2)
            summary["mean_new_tokens"] = round(sum(r.new_tokens for r in records) / len(records), 2)
        return summary

    def check_data(self) -> None:
        if self.params.data_dir is not None:
            self.dataset.load(self.params.data_dir, self.kind)

    def data_fingerprint(self) -> dict[str, Any] | None:
        """The local data files read; None for hub data."""
        if self.params.data_dir is None:
            return None
        return files_fingerprint(self.params.data_dir, [name for _, name in self.dataset.parts])


@register
class Math500(MathTask):
    kind = "math500"
    dataset = DATASETS["math500"]


@register
class AIME25(MathTask):
    kind = "aime25"
    dataset = DATASETS["aime25"]


@register
class GSM8K(MathTask):
    kind = "gsm8k"
    dataset = DATASETS["gsm8k"]
