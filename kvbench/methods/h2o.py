from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.methods import register
from kvbench.methods.base import EvictionLayer, Method, Phase
from kvbench.params import param
from kvbench.methods.scores import attention_with_received, top_and_recent
from kvbench.storage import DenseStore


@dataclass
class H2OParams:
    #: share of the capacity given to the most recent tokens; the rest goes to heavy hitters. The H2O
    #: paper's default gives both the same share (heavy_ratio = recent_ratio, e.g. 10% + 10%)
    recent_fraction: float = param(0.5, ge=0, le=1)


class H2OLayer(EvictionLayer):
    def make_stores(self):
        # the accumulated attention of every held token
        return {**super().make_stores(), "scores": DenseStore(bookkeeping=True)}

    @property
    def scores(self) -> torch.Tensor | None:
        return self.stores["scores"].tensor

    def attend(self, query, keys, values, scaling, sliding_window):
        # every query of every step adds its attention to the tokens it sees (the new ones start at 0);
        # the step's output comes from the same probabilities (exact attention, computed once)
        out, step = attention_with_received(query, keys, values, scaling)
        old = self.scores
        self.stores["scores"].set(step if old is None else step + F.pad(old, (0, keys.shape[2] - old.shape[-1])))
        return out

    def compress(self, phase: Phase) -> None:
        n = self.get_seq_length()
        if n <= self.capacity:
            return
        recent = int(self.capacity * self.method.params.recent_fraction)
        if phase == "decode":
            # one token over: the lowest-scoring token outside the recent window leaves. The window
            # is told by position (evict_one does not keep the held order): the last `recent`
            # positions. Of the capacity + 1 tokens held, at least one is older.
            older = self.positions < self.seen - recent
            self.evict_one(self.scores.masked_fill(~older, float("inf")).argmin(dim=-1, keepdim=True))
            return
        self.keep(top_and_recent(self.scores, n, self.capacity, recent))


@register
class H2O(Method):
    """H2O, Heavy-Hitter Oracle (Zhang et al. 2023; FMInference/H2O).

    Every held token's score is its accumulated attention: the sum, over every query that has seen it
    (all prompt queries, then each decoded token's), of its attention probability, per KV head (mean
    over the query heads of a GQA group). At the end of every step - prefill, appended question and
    each decoding step - the cache is cut back to the capacity: the most recent
    ``recent_fraction * capacity`` tokens plus the highest-scoring older tokens (heavy hitters), so it
    never holds more than the capacity between steps. Scores of kept tokens carry over. The sums and
    the step's exact attention output come from the same probabilities, computed in query chunks
    (``scores.attention_with_received``), never as an n x n matrix. The prefill's attention and
    score sums do not depend on the capacity, so the prefill is shared between ratios.
    """

    name = "h2o"
    Params = H2OParams
    layer = H2OLayer
    phases = ("prefill", "append", "decode")
