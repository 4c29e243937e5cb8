"""LongBench v1 and LongBench-E (THUDM/LongBench), prompts built as the official ``pred.py`` does.

One configured ``longbench`` task is a suite: :meth:`LongBench.subtasks` returns one task per
LongBench task (``narrativeqa``, ..., or ``hotpotqa_e`` for LongBench-E), so each gets its own
results directory. Prompt templates, max_new_tokens, the chat-template rule and the metrics come
from ``task_data/longbench/tasks.yaml`` through :mod:`kvbench.scoring.longbench`, which also scores.

Prompt building, per example (pred.py):

1. ``template.format(context=..., input=...)``;
2. tokenize with special tokens; if longer than ``model.max_prompt_tokens`` (the official
   ``max_length``), keep the first and the last ``int(max/2)`` tokens, decode each part with
   special tokens skipped and concatenate the two strings;
3. the runner applies the model's chat template afterwards, except for trec, triviaqa, samsum,
   lsht, lcc and repobench-p (``Sample.chat_template`` False);
4. dataset2maxlen new tokens; samsum also stops at "\\n" and generates at least one token.

Several questions of one dataset can ask about the same document (the same ``context``): they form
one cluster (``Sample.cluster``, a hash of the context before truncation), so intervals and paired
tests resample documents, not questions. An example with a context of its own is its own cluster.

Compression modes (``compress``):

``whole`` (default)
    the whole prompt, question included, is prefilled and compressed, then decoding starts. The
    prompt is one string, tokenized once, so the token sequence is exactly pred.py's. This is the
    setting of the published KV-compression LongBench numbers (SnapKV, PyramidKV,
    KVCache-Factory: the question is in the observation window), and pred.py itself has no
    compression step to follow.
``context``
    kvpress's question-agnostic setting: the context part is prefilled and compressed, the
    question part is appended uncompressed. The split point is in the template: the question part
    starts at the line holding the last ``{input}`` ("Question: {input}\\nAnswer:", a trec query,
    the abstract of passage_retrieval, repobench-p's in-file code), but never before the end of
    ``{context}``; templates without ``{input}`` (gov_report, multi_news, vcsum, passage_count,
    lcc), or with ``{input}`` before ``{context}``, keep as question the instructions that follow
    the context. After a middle truncation the question part is found again at the end of the
    truncated prompt; if the truncation cut into it, the whole prompt is compressed (a warning is
    logged). The two parts are tokenized separately, so a token can differ at the boundary.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kvbench.errors import ConfigError, DataError
from kvbench.params import param
from kvbench.results import SampleRecord
from kvbench.scoring.longbench import CATEGORIES, E_TASKS, TASKS, score_sample, task_score, task_score_e
from kvbench.tasks import register
from kvbench.tasks.base import (Sample, Task, TaskGroup, compress_mode, context_cluster, files_fingerprint, location,
                                read_jsonl, require_fields, unique_ids)

log = logging.getLogger(__name__)

VARIANTS = ("v1", "e")
HUB_DATASET = "THUDM/LongBench"
#: The hub repository's main branch only has a loading script, which datasets>=4 no longer runs;
#: the Hub's automatic Parquet conversion of every config lives on this branch.
HUB_REVISION = "refs/convert/parquet"
DATA_ZIP_URL = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"
#: pred.py: `if dataset == "samsum"` -> eos_token_id also "\n", min_length = prompt + 1
SAMSUM_STOP_TOKENS = ["\n"]


@dataclass
class LongBenchParams:
    #: LongBench task names (base names, also for LongBench-E); null = every task of the variant
    tasks: list[str] | None = None
    #: v1: LongBench (21 tasks); e: LongBench-E, the `{task}_e` sets of 13 tasks
    variant: str = param("v1", choices=VARIANTS)
    #: folder of official-format `{task}.jsonl` / `{task}_e.jsonl` (the unzipped data.zip);
    #: null = the hub dataset (needs network access). Not part of the run identity: the file's
    #: content hash is (moving the folder keeps a results directory resumable)
    data_dir: str | None = location()
    #: hub revision when data_dir is null
    revision: str = HUB_REVISION
    #: whole: prompt and question compressed together (pred.py's token sequence); context: see above
    compress: str = compress_mode()
    #: a seeded random subset of this many examples per task (kept in dataset order); null = all.
    #: (The top-level `limit=N` takes the first N of each task instead, for smoke tests.)
    limit: int | None = param(None, ge=1)
    seed: int = 42

    def validate(self) -> None:
        available = available_tasks(self.variant)
        if self.tasks is None:
            self.tasks = available
        for name in self.tasks:
            if name not in available:
                raise ConfigError(_unknown_task_message(name, self.variant))
        if self.data_dir is not None:
            for name in self.tasks:
                data_file(self.data_dir, dataset_name(name, self.variant))  # fail before the model loads


def available_tasks(variant: str) -> list[str]:
    """Base names of the tasks of a variant, in table order."""
    return [name for name in TASKS if variant == "v1" or name in E_TASKS]


def _unknown_task_message(name: str, variant: str) -> str:
    valid = ", ".join(available_tasks(variant))
    if variant == "e" and name in TASKS:
        return f"LongBench-E has no '{name}_e' set; the {len(E_TASKS)} LongBench-E tasks are: {valid}"
    if name.endswith("_e") and name[:-2] in E_TASKS:
        return (f"'{name}': list base task names and select LongBench-E with task.variant=e "
                f"(or use task=longbench/{name})")
    return f"unknown LongBench task '{name}' (variant {variant}); valid tasks: {valid}"


def dataset_name(task: str, variant: str) -> str:
    """``hotpotqa`` -> ``hotpotqa`` (v1) or ``hotpotqa_e`` (e): the hub config and file name."""
    return task if variant == "v1" else f"{task}_e"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

#: fields kvbench reads from an example, with their official types
_FIELDS = {"input": str, "context": str, "answers": list, "length": (int, float), "_id": str}
#: what to do when the data is missing
LAYOUT_HELP = (f"download {DATA_ZIP_URL} and unzip it (it holds data/{{task}}.jsonl and "
               "data/{task}_e.jsonl), then pass that data/ folder as data_dir=... (or task.data_dir=...)")


def data_file(data_dir: str | Path, name: str) -> Path:
    """The JSONL file of one dataset in a local data folder; a DataError saying where to put it."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"LongBench data folder {folder} does not exist; {LAYOUT_HELP}")
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"LongBench file {path} not found (expected {name}.jsonl in {folder}); "
                        f"{LAYOUT_HELP}")
    return path


def check_example(example: Any, where: str) -> dict:
    """The fields kvbench reads, with their official types; ``where`` names the file and line."""
    require_fields(example, where, _FIELDS, DataError)
    if not all(isinstance(a, str) for a in example["answers"]):
        raise DataError(f"{where}: field 'answers' must be a list of strings")
    classes = example.get("all_classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{where}: field 'all_classes' must be a list of strings or null")
    return example


def read_examples(path: Path) -> list[dict]:
    """Examples of an official-format JSONL file; blank lines are skipped, anything else malformed
    (encoding, JSON, fields, a repeated ``_id``) stops with the file and line number."""
    places, examples = [], []
    for where, example in read_jsonl(path):
        places.append(where)
        examples.append(check_example(example, where))
    unique_ids(zip(places, (example["_id"] for example in examples)), str(path))
    return examples


def load_hub(name: str, revision: str) -> list[dict]:
    """The test split of one hub config, as a list of dicts."""
    try:
        from datasets import load_dataset

        rows = load_dataset(HUB_DATASET, name, split="test", revision=revision)
    except Exception as err:  # offline, no such revision, a datasets version that cannot load it...
        raise DataError(
            f"could not load {HUB_DATASET} '{name}' (revision {revision}) from the Hugging Face hub: "
            f"{type(err).__name__}: {err}. Without hub access, {LAYOUT_HELP}"
        ) from err
    places = [f"{HUB_DATASET} {name} row {i}" for i in range(len(rows))]
    examples = [check_example(dict(row), where) for where, row in zip(places, rows)]
    unique_ids(zip(places, (example["_id"] for example in examples)), f"{HUB_DATASET} {name}")
    return examples


def load_examples(name: str, params: LongBenchParams) -> list[dict]:
    """One dataset's examples (local folder or hub), subsampled if ``limit``; never empty."""
    if params.data_dir is not None:
        path = data_file(params.data_dir, name)
        examples, source = read_examples(path), str(path)
    else:
        examples, source = load_hub(name, params.revision), f"{HUB_DATASET} {name}"
    if not examples:
        raise DataError(f"{source} has no examples")
    if params.limit is not None and params.limit < len(examples):
        keep = sorted(random.Random(params.seed).sample(range(len(examples)), params.limit))
        examples = [examples[i] for i in keep]
    return examples


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def question_start(template: str) -> int:
    """Where the question part of a template starts (module doc, ``context`` mode)."""
    if template.count("{context}") != 1:
        raise ValueError(f"a LongBench template needs exactly one {{context}}: {template!r}")
    context_end = template.index("{context}") + len("{context}")
    at = template.rfind("{input}")
    if at < context_end:  # no input, or the input comes before the context
        return context_end
    line_start = template.rfind("\n", 0, at) + 1
    return max(line_start, context_end)


def truncate_middle(prompt: str, tokenizer, max_tokens: int) -> tuple[str, bool]:
    """pred.py's middle truncation: (prompt, whether it was truncated)."""
    ids = tokenizer(prompt, truncation=False).input_ids  # with special tokens, as pred.py counts
    if len(ids) <= max_tokens:
        return prompt, False
    half = int(max_tokens / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, True


def split_question(prompt: str, question: str, tokenizer) -> tuple[str, str]:
    """(context, question) with ``question`` found at the end of a (truncated) prompt.

    A decoded tail can differ from the original text when the tokenizer's decode is not exact
    (e.g. cleanup of spaces), so the question's own decode round trip is tried too.
    """
    if not question:
        return prompt, ""
    roundtrip = tokenizer.decode(tokenizer(question, add_special_tokens=False).input_ids,
                                 skip_special_tokens=True)
    for candidate in (question, roundtrip):
        if candidate and prompt.endswith(candidate):
            return prompt[: len(prompt) - len(candidate)], candidate
    log.warning("the middle truncation cut into the question part; compressing the whole prompt")
    return prompt, ""


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@register
class LongBench(Task):
    """The LongBench suite; an instance with one task is a subtask (one results directory)."""

    kind = "longbench"
    Params = LongBenchParams
    main_metric = "score"

    def subtasks(self) -> list[Task]:
        p = self.params
        return [LongBench(dataset_name(t, p.variant), replace(p, tasks=[t])) for t in p.tasks]

    @property
    def task(self) -> str:
        """The base task name of a subtask (``hotpotqa`` for ``hotpotqa_e``)."""
        if len(self.params.tasks) != 1:
            raise RuntimeError(f"'{self.name}' is a suite of {len(self.params.tasks)} tasks; "
                               "use its subtasks()")
        return self.params.tasks[0]

    @property
    def dataset(self) -> str:
        return dataset_name(self.task, self.params.variant)

    def samples(self, tokenizer, model_cfg) -> list[Sample]:
        return [self.build_sample(example, tokenizer, model_cfg.max_prompt_tokens)
                for example in load_examples(self.dataset, self.params)]

    def build_sample(self, example: dict, tokenizer, max_prompt_tokens: int) -> Sample:
        spec = TASKS[self.task]
        template = spec["prompt"]
        prompt = template.format(context=example["context"], input=example["input"])
        prompt, truncated = truncate_middle(prompt, tokenizer, max_prompt_tokens)
        if self.params.compress == "whole":
            context, question = prompt, ""  # one string, tokenized once, as pred.py does
        else:
            question = template[question_start(template):].format(input=example["input"])
            context, question = split_question(prompt, question, tokenizer)
        samsum = self.task == "samsum"
        return Sample(
            id=example["_id"],
            context=context,
            question=question,
            answers=list(example["answers"]),
            max_new_tokens=spec["max_new_tokens"],
            chat_template=spec["chat_template"],
            stop_tokens=list(SAMSUM_STOP_TOKENS) if samsum else [],
            min_new_tokens=1 if samsum else 0,
            meta={
                "_id": example["_id"],
                "length": example["length"],
                "all_classes": example.get("all_classes"),
                "language": example.get("language", spec["language"]),
                "category": spec["category"],
                "truncated": truncated,
            },
            cluster=context_cluster(example["context"]),
        )

    def score(self, record: SampleRecord) -> dict[str, float]:
        """0..1 per example (eval.py's per-example score); the task score is 100 x the mean."""
        all_classes = record.meta.get("all_classes")
        return {"score": score_sample(self.dataset, record.pred, record.answers, all_classes)}

    def summarize(self, records: list[SampleRecord]) -> dict[str, Any]:
        """eval.py: ``round(100 * mean, 2)``; LongBench-E adds the length buckets (``score_e``)."""
        if not records:
            return {}
        scores = [r.scores["score"] for r in records]
        summary: dict[str, Any] = {"score": task_score(scores)}
        if self.params.variant == "e":
            summary["score_e"] = task_score_e(scores, [r.meta["length"] for r in records])
        return summary

    def check_data(self) -> None:
        if self.params.data_dir is not None:
            for task in self.subtasks():
                read_examples(data_file(self.params.data_dir, task.dataset))

    def data_fingerprint(self) -> dict[str, Any] | None:
        """The local data file a subtask reads; None for hub data, which the ``revision`` parameter
        identifies."""
        if self.params.data_dir is None:
            return None
        return files_fingerprint(self.params.data_dir, [data_file(self.params.data_dir, self.dataset).name])

    def groups(self) -> list[TaskGroup]:
        category = TASKS[self.task]["category"]
        return [TaskGroup("LongBench category", category, CATEGORIES.index(category))]

    @classmethod
    def store_configs(cls, config_store) -> None:
        """Register ``task=longbench/<task>`` (and ``longbench/<task>_e``) in Hydra's ConfigStore.

        Generated from the task table and the parameter defaults, so the 34 configs cannot drift
        from them; every parameter is present, so ``task.compress=context`` etc. can be overridden.
        """
        defaults = asdict(LongBenchParams())
        for task in TASKS:
            for variant in VARIANTS:
                if variant == "e" and task not in E_TASKS:
                    continue
                name = dataset_name(task, variant)
                node = {"name": name, "kind": cls.kind, **defaults, "tasks": [task],
                        "variant": variant, "data_dir": "${data_dir}"}
                config_store.store(group="task/longbench", name=name, node=node)
