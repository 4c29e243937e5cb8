"""The classic needle-in-a-haystack grid (Kamradt, gkamradt/LLMTest_NeedleInAHaystack): one needle
at each depth of a haystack of each context length, scored by whether the answer is in the output.

Prompt (``kvbench/task_data/niah/niah.yaml``): Kamradt's system message, the haystack with the
needle, then the retrieval question and Kamradt's suffix ("Don't give information outside the
document or repeat your findings"). Kamradt sends the system message and two user messages; kvbench
writes the three texts into one message, separated by blank lines, because a sample has one.

Haystack (``haystack``): RULER's, the same sources as RULER's niah tasks (``kvbench.tasks.ruler``):

``noise`` (default)
    RULER's noise sentences ("The grass is green. ..."), repeated; needs no data, so the grid runs
    offline on CPU.
``essay``
    the Paul Graham essays, Kamradt's and RULER's haystack, read from RULER's
    ``PaulGrahamEssays.json`` in ``data_dir`` (kvbench does not ship them).

The haystack is split into sentences (after ``.``, ``!`` or ``?``, as kvbench's RULER tasks split it) and
starts at a sentence drawn from a generator seeded by (seed, length, index), wrapping around the
text; the same haystack serves every depth of a (length, index), as in Kamradt's grid.

Length: the number of sentences is the largest whose whole prompt, as the runner tokenizes it
(chat template included), has at most ``length`` tokens (RULER's search, shared with
``kvbench.tasks.ruler``). Kamradt counts the context and reserves 200 tokens for the rest; here
the target is the prompt the model reads, as for ``task=passkey``.

Depth: Kamradt puts the needle at token ``int(depth * haystack tokens)`` and moves it back to the
end of the sentence before it. Here the needle goes after the last sentence that ends at or before
``depth`` of the haystack's tokens (each sentence counted in the model's tokenizer): the same place,
up to how tokens merge across sentence boundaries, without decoding tokens back into text.
``meta["needle_depth"]`` records the fraction of the haystack's tokens before the needle.

Clusters (``Sample.cluster``): with ``essay``, the depths of a (length, index) share one drawn
passage, so they form one cluster, and intervals and paired tests resample passages. The ``noise``
haystack is one fixed text whatever its first sentence, so no draw is shared and its samples are
not clustered (nor are passkey's, whose filler is fixed and whose keys are drawn per sample).

Template (``template``): ``chat`` (default; Kamradt's test is a chat prompt) puts the prompt in the
model's chat template as RULER's ``chat`` template does (``kvbench.tasks.ruler.layout``), when the
model config and the tokenizer have one; ``base`` uses none.

Scoring: 1 when the answer is contained in the prediction, case-insensitively after RULER's
post-processing (``kvbench.scoring.ruler.match_all``), else 0. Kamradt grades with a GPT-4 judge
(1-10) and kvpress with ROUGE; containment needs no model and no tokenization choice. The task
score is the mean per (length, depth) cell, then over cells (as ``task=passkey``), and every run
gets a depth x length heatmap.

A needle, question or answer given as a parameter may hold ``{value}``: a 7-digit number drawn per
sample from a generator seeded by (seed, length, depth, index), so that the model cannot know it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


from kvbench.errors import ConfigError
from kvbench.params import param
from kvbench.results import SampleRecord
from kvbench.scoring.ruler import SPEC, match_all
from kvbench.tasks import register
from kvbench.tasks.base import Sample, Task, compress_mode, files_fingerprint, location, task_yaml
from kvbench.tasks.passkey import depth_length_heatmap, grid_summary
from kvbench.tasks.ruler import (
    DATA_FILES,
    DATA_HELP,
    TEMPLATES,
    essay_words,
    largest_fitting,
    layout,
    prompt_tokens,
    size_haystack,
    split_sentences,
)

HAYSTACKS = ("noise", "essay")
METRIC = "contains"


@dataclass
class NiahParams:
    #: target prompt lengths in tokens of the model's tokenizer (chat template included)
    lengths: list[int] = param([512, 1024], ge=1)
    #: needle depths as fractions of the haystack's tokens (0 = start, 1 = end)
    depths: list[float] = param([0.0, 0.25, 0.5, 0.75, 1.0], ge=0, le=1)
    samples_per_cell: int = param(1, ge=1)
    seed: int = 42
    #: noise: RULER's noise sentences (offline); essay: the Paul Graham essays from data_dir
    haystack: str = param("noise", choices=HAYSTACKS)
    #: folder holding RULER's PaulGrahamEssays.json (haystack=essay). Not part of the run identity:
    #: the content of the file is
    data_dir: str | None = location()
    #: chat: the model's chat template (Kamradt's test is a chat prompt); base: none
    template: str = param("chat", choices=TEMPLATES)
    #: the needle, the question and the answer looked for; null = Kamradt's (task_data/niah/niah.yaml)
    needle: str | None = None
    question: str | None = None
    answer: str | None = None
    #: Kamradt: 300; the answer needs about 20
    max_new_tokens: int = param(48, ge=1)
    #: whole: the question is compressed with the haystack; context: appended after, uncompressed
    compress: str = compress_mode()

    def validate(self) -> None:
        texts = self.texts()
        for name in ("needle", "question", "answer"):
            try:
                texts[name].format(value="0")
            except (KeyError, IndexError, ValueError) as err:
                raise ConfigError(f"niah.{name}={texts[name]!r}: braces other than {{value}} must be doubled "
                                  f"({type(err).__name__}: {err})") from None
        if not texts["answer"].strip():
            raise ConfigError("niah answer must not be empty (an empty answer is contained in every output)")
        if "{value}" in texts["answer"] and "{value}" not in texts["needle"]:
            raise ConfigError("niah answer holds {value} but the needle does not: the haystack would not hold the answer")
        if self.haystack == "essay":
            essay = DATA_FILES["essay"]
            if self.data_dir is None or not (Path(self.data_dir) / essay).is_file():
                where = f"data_dir {self.data_dir} has no {essay}" if self.data_dir else "no data_dir given"
                raise ConfigError(f"niah haystack=essay needs {DATA_HELP['essay']}; {where}. Pass data_dir=<folder> "
                                  "(or task.data_dir=...), or use the offline haystack (task.haystack=noise)")

    def texts(self) -> dict[str, str]:
        """Kamradt's texts, with the needle, question and answer given as parameters instead."""
        texts = dict(kamradt_texts())
        texts.update({k: v for k, v in (("needle", self.needle), ("question", self.question),
                                         ("answer", self.answer)) if v is not None})
        return texts


@lru_cache(maxsize=1)
def kamradt_texts() -> dict[str, str]:
    return task_yaml("niah", "niah.yaml")


@lru_cache(maxsize=None)
def essay_sentences(data_dir: str) -> tuple[str, ...]:
    return tuple(split_sentences(" ".join(essay_words(data_dir))))


def insert_at_depth(sentences: list[str], counts: list[int], needle: str, depth: float) -> tuple[str, int]:
    """(haystack text, sentences before the needle): the needle after the last sentence that ends at or
    before ``depth`` of the tokens (``counts``: each sentence's tokens)."""
    target, before, k = depth * sum(counts), 0, 0
    while k < len(sentences) and before + counts[k] <= target:
        before += counts[k]
        k += 1
    head, tail = " ".join(sentences[:k]), " ".join(sentences[k:])
    text = needle
    if head:
        text = head + ("" if needle[:1].isspace() else " ") + text
    if tail:
        text = text + ("" if needle[-1:].isspace() else " ") + tail
    return text, k


@register
class Niah(Task):
    """Needle in a haystack over a context length x depth grid (see the module docstring)."""

    kind = "niah"
    Params = NiahParams
    main_metric = METRIC

    def check_data(self) -> None:
        """The essays (read once: they are cached)."""
        if self.params.haystack == "essay":
            essay_sentences(self.params.data_dir)

    def samples(self, tokenizer, model_cfg) -> list[Sample]:
        p = self.params
        texts = p.texts()
        chat = p.template == "chat" and getattr(model_cfg, "chat_template", True) and bool(tokenizer.chat_template)
        source = essay_sentences(p.data_dir) if p.haystack == "essay" else tuple(split_sentences(SPEC["noise"]))
        counted: dict[str, int] = {}

        def tokens_of(sentence: str) -> int:
            if sentence not in counted:
                counted[sentence] = len(tokenizer(sentence, add_special_tokens=False).input_ids)
            return counted[sentence]

        def build(n: int, start: int, depth: float, value: str) -> tuple[str, str, dict[str, Any]]:
            sentences = [source[(start + j) % len(source)] for j in range(n)]
            counts = [tokens_of(s) for s in sentences]
            haystack, k = insert_at_depth(sentences, counts, texts["needle"].format(value=value), depth)
            context = f"{texts['instruction']}\n\n{haystack}\n\n"
            query = texts["question"].format(value=value) + texts["question_suffix"]
            meta = {"units": n, "needle_depth": round(sum(counts[:k]) / sum(counts), 4)}
            return (*layout(tokenizer, chat, context, query, ""), meta)

        def fits(n: int, start: int, depth: float, value: str) -> int:
            return prompt_tokens(tokenizer, *build(n, start, depth, value)[:2])

        out = []
        for length in p.lengths:
            for i in range(p.samples_per_cell):
                start = random.Random(f"{p.seed}-{length}-{i}").randrange(len(source))
                most = size_haystack(lambda n: fits(n, start, p.depths[0], "0" * 7), length, 1, 20)
                for depth in p.depths:
                    value = str(random.Random(f"{p.seed}-{length}-{depth}-{i}").randint(10**6, 10**7 - 1))
                    n = most
                    if n is None or fits(n, start, depth, value) > length:
                        n = largest_fitting(lambda n: fits(n, start, depth, value) <= length, 1, max(1, (most or 1) - 1))
                    if n is None:
                        raise ConfigError(f"niah: the prompt with one haystack sentence already exceeds {length} "
                                          "tokens; choose longer lengths")
                    context, question, meta = build(n, start, depth, value)
                    out.append(Sample(
                        id=f"L{length}-D{depth:g}-{i}",
                        context=context,
                        question=question,
                        answers=[texts["answer"].format(value=value)],
                        max_new_tokens=p.max_new_tokens,
                        meta={"length": length, "depth": depth, **meta},
                        cluster=f"haystack-L{length}-{i}" if p.haystack == "essay" else None,
                    ))
        return out

    def score(self, record: SampleRecord) -> dict[str, float]:
        return {METRIC: match_all(record.pred, record.answers)}

    def summarize(self, records: list[SampleRecord]) -> dict[str, Any]:
        """Mean per (length, depth) cell, then over cells; ``cells`` for the heatmap."""
        return grid_summary(records, [METRIC])

    def figures(self, metrics: dict, title: str) -> dict:
        return depth_length_heatmap("niah", metrics, METRIC, "needle depth (fraction of haystack)", title)

    def data_fingerprint(self) -> dict[str, Any] | None:
        if self.params.haystack != "essay":
            return None
        return files_fingerprint(self.params.data_dir, [DATA_FILES["essay"]])
