"""Passkey retrieval: a key hidden at a chosen depth of a filler haystack of a chosen token length."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import mean


from kvbench.results import SampleRecord
from kvbench.scoring.passkey import exact_match, partial_match
from kvbench.params import param
from kvbench.tasks import register
from kvbench.tasks.base import Sample, Task, compress_mode, task_yaml

SCORERS = {"exact_match": exact_match, "partial_match": partial_match}


@dataclass
class PasskeyParams:
    #: digits of the key, each uniform in 0-9 (a leading 0 is possible), as in longctx_bench
    key_digits: int = param(5, ge=1)
    #: target prompt lengths in tokens of the model's tokenizer (the measured length is recorded)
    lengths: list[int] = param([512, 1024], ge=1)
    #: needle depths as fractions of the haystack (0 = start, 1 = end)
    depths: list[float] = param([0.0, 0.5, 1.0], ge=0, le=1)
    samples_per_cell: int = param(1, ge=1)
    seed: int = 0
    max_new_tokens: int = param(12, ge=1)
    #: whole: the question is compressed with the haystack (LagKV's setting); context: appended after
    compress: str = compress_mode()
    #: the metric reported as the task's score
    metric: str = param("exact_match", choices=tuple(SCORERS))


def load_texts() -> dict[str, str]:
    return task_yaml("passkey", "passkey.yaml")


@register
class Passkey(Task):
    """The classic passkey prompt (Landmark Attention, LongLoRA), no chat template.

    The haystack is the "grass is green" filler repeated so that the prompt reaches each target length
    in tokens; the needle goes between filler repeats at ``int(repeats * depth)``. Keys are drawn from a
    generator seeded by (seed, length, depth, index), so every sample is reproducible on its own.
    """

    kind = "passkey"
    Params = PasskeyParams

    @property
    def main_metric(self) -> str:
        return self.params.metric

    def samples(self, tokenizer, model_cfg) -> list[Sample]:
        texts = load_texts()
        p = self.params

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=True).input_ids)

        needle_len = count(texts["needle"].format(key="0" * p.key_digits))
        fixed = count(texts["instruction"] + texts["question"]) + needle_len
        per_repeat = count(texts["filler"] * 20) / 20
        out = []
        for length in p.lengths:
            repeats = max(0, round((length - fixed) / per_repeat))
            for depth in p.depths:
                for i in range(p.samples_per_cell):
                    rng = random.Random(f"{p.seed}-{length}-{depth}-{i}")
                    key = "".join(rng.choice("0123456789") for _ in range(p.key_digits))
                    at = int(repeats * depth)
                    context = (
                        texts["instruction"]
                        + texts["filler"] * at
                        + texts["needle"].format(key=key)
                        + texts["filler"] * (repeats - at)
                    )
                    out.append(
                        Sample(
                            id=f"L{length}-D{depth:g}-{i}",
                            context=context,
                            question=texts["question"],
                            answers=[key],
                            max_new_tokens=p.max_new_tokens,
                            meta={"length": length, "depth": depth},
                        )
                    )
        return out

    def score(self, record: SampleRecord) -> dict[str, float]:
        key = record.answers[0]
        return {name: fn(record.pred, key) for name, fn in SCORERS.items()}

    def summarize(self, records: list[SampleRecord]) -> dict:
        """Mean per (length, depth) cell, then mean over cells (longctx_bench's aggregation)."""
        return grid_summary(records, list(SCORERS))

    def figures(self, metrics: dict, title: str) -> dict:
        """The depth x length heatmap of the main metric."""
        return depth_length_heatmap("passkey", metrics, self.main_metric, "passkey depth (fraction of context)", title)


def grid_summary(records: list[SampleRecord], metrics: list[str]) -> dict:
    """Scores of a depth x length grid (``meta["length"]``, ``meta["depth"]``): the mean of each metric
    per cell, then over cells, x100, rounded to 2 places; ``cells`` holds each cell's means
    (keys ``"<length>/<depth>"``)."""
    if not records:
        return {}
    cells: dict[str, list[dict]] = {}
    for r in records:
        cells.setdefault(f"{r.meta['length']}/{r.meta['depth']:g}", []).append(r.scores)
    cell_means = {c: {m: mean(s[m] for s in ss) for m in metrics} for c, ss in cells.items()}
    summary: dict = {m: round(100 * mean(c[m] for c in cell_means.values()), 2) for m in metrics}
    summary["cells"] = {c: {m: round(100 * v, 2) for m, v in cm.items()} for c, cm in sorted(cell_means.items())}
    return summary


def depth_length_heatmap(name: str, metrics: dict, metric: str, depth_label: str, title: str) -> dict:
    """``{name: figure}``: the depth x length heatmap of ``metric`` from a :func:`grid_summary`
    (nothing when it has no cells)."""
    if not metrics.get("cells"):
        return {}
    from kvbench import plots  # matplotlib only when reporting

    values = {tuple(float(x) for x in key.split("/")): cell[metric] for key, cell in metrics["cells"].items()}
    lengths = sorted({length for length, _ in values})
    depths = sorted({depth for _, depth in values})
    grid = [[values.get((length, depth), math.nan) for length in lengths] for depth in depths]
    return {name: plots.heatmap(grid, lengths, depths, "context length (tokens)", depth_label, metric, title)}
