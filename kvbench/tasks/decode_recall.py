"""Recall after a long generation (``task=decode_recall``): a task that decode-time compression decides.

The prompt states a secret word and asks the model to count; the prompt itself starts the count,
so even the embedded 135M model continues it::

    The secret word is zebra. Remember it.
    Now count to 40: 1, 2, 3,

The model counts (``4, 5, ..., 40,``: about 4 tokens a number with SmolLM2's digit tokens); the
count stops at the stop string `` 40,``. Then the follow-up ``\\nThe secret word is`` is fed as if
generated (``Sample.followup``) and the model answers in up to ``answer_tokens`` tokens.

The prompt is short (about 20 tokens) and the count long, so a decode-time budget between the two
keeps the whole prompt at prefill and evicts during the count: the word survives only if the method
keeps it while decoding. StreamingLLM keeps its sinks and the most recent tokens, the count, and
loses the word; score-based methods keep it when its attention (or other score) holds up against
the count's tokens. The full cache recalls it (measured table: README.md, "Long generations").
What the count needs is local (the last numbers), so every method counts; ``counted`` checks it.

Scores (:mod:`kvbench.scoring.decode_recall`): ``recalled`` (the answer's first word is the secret
word; the main metric) and ``counted`` (the count reached ``count_to``, every number in order).
Samples: for each entry of ``count_to``, ``samples`` words drawn from the word list
(``task_data/decode_recall``) by a generator seeded with (seed, count_to, index).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


from kvbench.params import param
from kvbench.results import SampleRecord
from kvbench.scoring.decode_recall import counted, recalled
from kvbench.tasks import register
from kvbench.tasks.base import Sample, Task, compress_mode, task_yaml


@dataclass
class DecodeRecallParams:
    #: the numbers counted to (one group of samples each): the generation's length
    count_to: list[int] = param([40], ge=4)
    #: samples per count_to
    samples: int = param(20, ge=1)
    seed: int = 0
    #: cap on the count's tokens (about 4 per number); the answer gets its own answer_tokens
    max_new_tokens: int = param(400, ge=1)
    answer_tokens: int = param(4, ge=1)
    #: whole: the prompt is prefilled and compressed (there is no question to append)
    compress: str = compress_mode()


def load_texts() -> dict:
    return task_yaml("decode_recall", "decode_recall.yaml")


@register
class DecodeRecall(Task):
    kind = "decode_recall"
    Params = DecodeRecallParams
    main_metric = "recalled"

    def samples(self, tokenizer, model_cfg) -> list[Sample]:
        texts, p = load_texts(), self.params
        out = []
        for count_to in p.count_to:
            for i in range(p.samples):
                word = random.Random(f"{p.seed}-{count_to}-{i}").choice(texts["words"])
                out.append(Sample(
                    id=f"N{count_to}-{i}",
                    context=texts["prompt"].format(word=word, count_to=count_to),
                    question="",
                    answers=[word],
                    max_new_tokens=p.max_new_tokens,
                    # the count ends with its last number; a new line ends it early, and ends the answer
                    stop_strings=[f" {count_to},", "\n"],
                    followup=texts["followup"],
                    followup_new_tokens=p.answer_tokens,
                    meta={"count_to": count_to},
                ))
        return out

    def score(self, record: SampleRecord) -> dict[str, float]:
        followup = load_texts()["followup"]
        return {"recalled": recalled(record.pred, record.answers[0], followup),
                "counted": counted(record.pred, record.meta["count_to"], followup)}
