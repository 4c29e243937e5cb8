"""LongBench v2 (Bai et al. 2024, THUDM/LongBench): 503 multiple-choice questions over long
contexts, prompts built and answers judged as the official ``pred.py`` and ``result.py`` do.

Prompt building, per question (pred.py, zero-shot, no chain of thought):

1. the template of ``prompts/0shot.txt`` (``task_data/longbench_v2/prompts.yaml``) with ``$DOC$``,
   ``$Q$`` and ``$C_A$`` ... ``$C_D$`` replaced, in that order, by the stripped fields;
2. tokenized with special tokens; if longer than ``max_prompt_tokens`` (pred.py's ``max_len``:
   120000 for its 128k models; kvbench's default is the model config's ``max_prompt_tokens``),
   the first ``max // 2`` and the last ``-max // 2`` ids (Python's floor division: one more for an
   odd max) are kept and decoded together, special tokens skipped;
3. sent as one user message, so the runner applies the model's chat template;
4. 128 new tokens. pred.py samples at temperature 0.1; kvbench decodes greedily, as for every task.

pred.py's other modes (``--cot``: a 1024-token reasoning pass, then a second prompt for the answer;
``--rag``; ``--no_context``) are not implemented.

Questions asked about one document (the same ``context``) form one cluster (``Sample.cluster``), so
intervals and paired tests resample documents; a question with a document of its own is its own.

Scoring is :mod:`kvbench.scoring.longbench_v2` (extraction of "The correct answer is (X)"); the
task's scores are result.py's accuracies, overall and by difficulty and length, and the report
shows them as one table (:meth:`LongBenchV2.tables`).

Compression modes (``compress``): ``whole`` (default) compresses the whole prompt, question and
choices included, tokenized as one string as pred.py does; ``context`` compresses the text part
and appends the question part (from "What is the correct answer ..." on) uncompressed.

Data: the hub dataset ``THUDM/LongBench-v2`` (split ``train``), or ``data_dir`` holding the hub
repository's ``data.json`` (a JSON list of the questions with ``_id``, ``domain``, ``sub_domain``,
``difficulty``, ``length``, ``question``, ``choice_A`` ... ``choice_D``, ``answer``, ``context``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


from kvbench.errors import DataError
from kvbench.params import param
from kvbench.results import SampleRecord
from kvbench.scoring.longbench_v2 import CHOICES, DIFFICULTIES, LENGTHS, accuracies, judge
from kvbench.tasks import register
from kvbench.tasks.base import (
    ReportRun,
    Sample,
    Task,
    TaskTable,
    compress_mode,
    context_cluster,
    files_fingerprint,
    location,
    read_json,
    require_fields,
    task_yaml,
    unique_ids,
)
from kvbench.tasks.longbench import split_question

HUB_DATASET = "THUDM/LongBench-v2"
DATA_FILE = "data.json"
#: the fields of a question, with their official types
FIELDS = {name: str for name in ("_id", "domain", "sub_domain", "difficulty", "length", "question",
                                 "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")}
#: where the question part starts in the template (``compress: context``)
QUESTION_START = "What is the correct answer to this question:"
HELP = (f"download {DATA_FILE} from the hub dataset {HUB_DATASET} into a folder and pass it as "
        "data_dir=... (or task.data_dir=...)")


@dataclass
class LongBenchV2Params:
    #: folder holding the hub repository's data.json; null = the hub dataset. Not part of the run
    #: identity: the file's content hash is
    data_dir: str | None = location()
    #: pred.py's max_len (120000 for 128k models); null = the model config's max_prompt_tokens
    max_prompt_tokens: int | None = param(None, ge=2)
    #: whole: the question is compressed with the text; context: appended after, uncompressed
    compress: str = compress_mode()
    #: a seeded random subset of this many questions (kept in dataset order); null = all 503
    limit: int | None = param(None, ge=1)
    seed: int = 42

    def validate(self) -> None:
        if self.data_dir is not None:
            data_path(self.data_dir)  # fail before the model loads


def data_path(data_dir: str | Path) -> Path:
    path = Path(data_dir) / DATA_FILE
    if not path.is_file():
        raise DataError(f"LongBench v2 file {path} not found; {HELP}")
    return path


def check_question(row: Any, where: str) -> dict:
    require_fields(row, where, FIELDS, DataError)
    if row["answer"] not in CHOICES:
        raise DataError(f"{where}: field 'answer' must be one of {CHOICES}, got {row['answer']!r}")
    return row


@lru_cache(maxsize=None)
def load_questions(data_dir: str | None) -> tuple[dict, ...]:
    """Every question, from ``data_dir/data.json`` or the hub; never empty."""
    if data_dir is not None:
        path = data_path(data_dir)
        rows = read_json(path)
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of questions, got {type(rows).__name__}")
        source = str(path)
    else:
        try:
            from datasets import load_dataset

            rows = [dict(row) for row in load_dataset(HUB_DATASET, split="train")]
        except Exception as err:  # offline, renamed dataset...
            raise DataError(f"could not load {HUB_DATASET} from the Hugging Face hub ({type(err).__name__}: "
                            f"{err}); without hub access, {HELP}") from err
        source = HUB_DATASET
    if not rows:
        raise DataError(f"{source} has no questions")
    questions = tuple(check_question(row, f"{source} question {i}") for i, row in enumerate(rows))
    unique_ids(((f"{source} question {i}", q["_id"]) for i, q in enumerate(questions)), source)
    return questions


def fill(template: str, question: dict) -> str:
    """pred.py's chain of replacements (a placeholder inside an earlier value is replaced too)."""
    text = template.replace("$DOC$", question["context"].strip()).replace("$Q$", question["question"].strip())
    for choice in CHOICES:
        text = text.replace(f"$C_{choice}$", question[f"choice_{choice}"].strip())
    return text


def truncate_middle(prompt: str, tokenizer, max_tokens: int) -> tuple[str, bool]:
    """pred.py's truncation: (prompt, whether it was truncated)."""
    ids = tokenizer(prompt).input_ids  # tokenizer.encode: with special tokens
    if len(ids) <= max_tokens:
        return prompt, False
    return tokenizer.decode(ids[: max_tokens // 2] + ids[-max_tokens // 2:], skip_special_tokens=True), True


@lru_cache(maxsize=1)
def prompt_spec() -> dict:
    return task_yaml("longbench_v2", "prompts.yaml")


@register
class LongBenchV2(Task):
    """LongBench v2's 503 questions as one task (see the module docstring)."""

    kind = "longbench_v2"
    Params = LongBenchV2Params
    main_metric = "accuracy"

    def check_data(self) -> None:
        """Every question of data.json (read once: they are cached)."""
        if self.params.data_dir is not None:
            load_questions(self.params.data_dir)

    def samples(self, tokenizer, model_cfg) -> list[Sample]:
        p = self.params
        questions = list(load_questions(p.data_dir))
        if p.limit is not None and p.limit < len(questions):
            keep = sorted(random.Random(p.seed).sample(range(len(questions)), p.limit))
            questions = [questions[i] for i in keep]
        max_tokens = p.max_prompt_tokens or model_cfg.max_prompt_tokens
        return [self.build_sample(q, tokenizer, max_tokens) for q in questions]

    def build_sample(self, question: dict, tokenizer, max_tokens: int) -> Sample:
        spec = prompt_spec()
        template = spec["template"]
        prompt, truncated = truncate_middle(fill(template, question), tokenizer, max_tokens)
        if self.params.compress == "whole":
            context, asked = prompt, ""
        else:
            context, asked = split_question(prompt, fill(template[template.index(QUESTION_START):], question),
                                            tokenizer)
        return Sample(
            id=question["_id"],
            context=context,
            question=asked,
            answers=[question["answer"]],
            max_new_tokens=spec["max_new_tokens"],
            chat_template=True,
            meta={"difficulty": question["difficulty"], "length": question["length"], "domain": question["domain"],
                  "sub_domain": question["sub_domain"], "truncated": truncated},
            cluster=context_cluster(question["context"]),
        )

    def score(self, record: SampleRecord) -> dict[str, float]:
        return {"accuracy": judge(record.pred, record.answers[0])}

    def summarize(self, records: list[SampleRecord]) -> dict[str, Any]:
        """result.py's accuracies: overall, easy / hard, short / medium / long."""
        return accuracies((r.scores["accuracy"], r.meta["difficulty"], r.meta["length"]) for r in records)

    @classmethod
    def tables(cls, runs: list[ReportRun]) -> dict[str, TaskTable]:
        """The official results table: overall, easy, hard, short, medium and long accuracy per run."""
        if not runs:
            return {}
        groups = ("accuracy", *DIFFICULTIES, *LENGTHS)
        body = [[run.method, run.setting, *(f"{run.metrics[g]:.1f}" if g in run.metrics else "n/a" for g in groups)]
                for run in runs]
        caption = ("Accuracy (%) as LongBench v2's result.py reports it, overall and by difficulty and length "
                   "(n/a: no question of the group was run).")
        header = ["method", "setting", *(g.capitalize() for g in ("overall", *groups[1:]))]
        return {"LongBench v2": TaskTable(caption, header, body)}

    def data_fingerprint(self) -> dict[str, Any] | None:
        if self.params.data_dir is None:
            return None
        return files_fingerprint(self.params.data_dir, [DATA_FILE])

