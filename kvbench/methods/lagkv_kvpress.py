"""kvpress's ``LagKVPress`` (NVIDIA/kvpress ``kvpress/presses/lagkv_press.py``): LagKV's scores, used once.

Differs from the authors' LagKV (``lagkv``) in how the scores select tokens:

* once, after prefill (no recursion, no decode-time compression; an appended question is not
  compressed), with one global top-``capacity`` over the whole prompt instead of a fixed number per
  partition;
* per token ``(s_K + s_V) / 2`` (LagKV's lag-relative scores, :func:`lag_relative_scores`), replaced by
  its rank inside its partition divided by ``L`` (kvpress's default ``cross_scoring=False``), so every
  partition competes on equal terms;
* the ``S`` sinks and the window (last full partition + remainder) score 1, above every rank (< 1),
  so they are forced in whenever the capacity allows;
* a prompt shorter than ``S + 2L`` scores the sinks 1 and the rest ``i / (n - S)``: the top-k is then
  the sinks plus the most recent tokens (StreamingLLM);
* defaults sink 4, lag 128 (kvpress's ``n_sink``, ``lag_size``).

kvbench's capacity is ``round(n / ratio)`` (kvpress: ``int(n * (1 - compression_ratio))``), the same
for every method. Ties (equal scores: forced tokens when the capacity is below sink + window, equal
ranks of different partitions) go to the earlier position (stable sort) so runs are deterministic;
kvpress leaves them to ``torch.topk``. The constant-channel guard of :func:`lag_relative_scores`
applies here too (kvpress has none either). kvpress's experimental ``cross_scoring`` is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods import register
from kvbench.methods.base import Method, ScoreKeepLayer
from kvbench.methods.lagkv import lag_relative_scores
from kvbench.params import param


@dataclass
class LagKVPressParams:
    #: sink tokens, always kept (kvpress's ``n_sink``)
    sink_tokens: int = param(4, ge=0)
    #: partition length L (kvpress's ``lag_size``)
    lag_size: int = param(128, ge=1)


def kvpress_lag_scores(keys: torch.Tensor, values: torch.Tensor, sink: int, lag: int) -> torch.Tensor:
    """Scores (batch, heads, n) of kvpress's LagKVPress: 1 for sink and window, in-partition ranks / L
    for the rest; for a short prompt, 1 for the sinks and increasing with position for the rest."""
    b, h, n, _ = keys.shape
    score = torch.ones(b, h, n, device=keys.device)  # sinks and window: 1, above every rank
    if n < sink + 2 * lag:
        if n > sink:
            score[:, :, sink:] = torch.arange(n - sink, device=keys.device) / (n - sink)
        return score
    end = sink + (n - sink) // lag * lag
    mixed = lag_relative_scores(keys[:, :, sink:end], lag) + lag_relative_scores(values[:, :, sink:end], lag)
    mixed = mixed / 2  # kvpress averages; the ranks below do not depend on it
    rank = mixed.argsort(dim=-1, stable=True).argsort(dim=-1) / lag  # 0 .. (L-1)/L inside each partition
    score[:, :, sink:end - lag] = rank.flatten(-2)
    return score


class LagKVPressLayer(ScoreKeepLayer):
    def score(self):
        params = self.method.params
        return kvpress_lag_scores(self.keys, self.values, params.sink_tokens, params.lag_size)

    def choose(self, scores):
        # ties to the earlier position (a stable sort), where torch.topk leaves them open
        return scores.sort(dim=-1, descending=True, stable=True).indices[..., : self.capacity]


@register
class LagKVPress(Method):
    """kvpress's LagKVPress variant of LagKV; see the module docstring."""

    name = "lagkv_kvpress"
    Params = LagKVPressParams
    layer = LagKVPressLayer
    phases = ("prefill",)
