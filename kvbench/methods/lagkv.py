"""LagKV (Liang et al. 2025, arXiv 2504.04704): attention-free eviction scored against the next partition.

Reproduces the authors' ``lag_kv.py`` (AI-Lab-China-Merchants-Bank/LagKV). Per layer the cache is
``[0, base)`` (final: the ``S`` sink tokens plus what earlier compressions kept) followed by tokens not
yet compressed. Whenever the cache holds ``n >= base + 2L`` tokens (checked after every forward step:
prefill, appended question and every decode step, so compression is recursive):

* ``end = base + floor((n - base) / L) * L``; ``[base, end)`` is ``P`` partitions of ``L`` tokens;
* each partition ``p < P - 1`` is scored against partition ``p + 1`` (its "lag"), separately for keys
  and values (:func:`lag_relative_scores`), ``score = s_K + score_v_ratio * s_V``;
* each of those partitions keeps its top ``int(L / ratio)`` tokens per (batch, KV head); the last full
  partition and the remainder ``[end - L, n)`` are the window, kept whole; ``base`` grows by what was
  kept.

Cache length for ``n`` tokens seen (``n >= S + 2L``, ``k`` kept per partition)::

    S + k * (floor((n - S) / L) - 1) + L + (n - S) mod L

Choices where the source leaves a gap:

* Constant channel: the source divides by ``max - min`` with no epsilon, so a channel that is constant
  over a reference partition gives 0/0 = NaN and a NaN score. Here the normalised value of such a
  channel is 0 (the channel carries no lag-relative information), which keeps the scores finite.
* Scores are computed in float32 (the source uses the cache dtype); this only removes rounding ties.
* Kept tokens are re-sorted by position (the source keeps them in score order; with RoPE already
  applied to cached keys the order does not change attention).
* Budget mode (the paper is ratio-only): at the end of the first prefill step the budget ``B`` is turned
  into the number ``k`` kept per partition, the largest ``k <= L`` for which the compressed prompt
  ``S + k (P - 1) + L + rem`` fits ``B`` (0 if even the sink and window alone exceed ``B``). A prompt
  too short to compress (``P < 2``) gets ``k = floor(L * B / n)``, the rate of the ratio ``n / B``.
  ``k`` is then fixed, so the cache keeps growing by ``k`` tokens per ``L`` during decoding, as LagKV
  does in ratio mode: the budget bounds the compressed prompt, not the generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods import register
from kvbench.methods.base import KVLayer, Method, Phase
from kvbench.params import param


@dataclass
class LagKVParams:
    #: tokens at the start of the sequence that are never scored (the code's ``sink_size``)
    sink_tokens: int = param(16, ge=0)
    #: partition length L (the code's ``lag_size``; paper grid 128 / 512 / 1024)
    lag_size: int = param(1024, ge=1)
    #: weight of the value score in ``s_K + score_v_ratio * s_V``
    score_v_ratio: float = param(1.0, ge=0)


def lag_relative_scores(x: torch.Tensor, lag: int) -> torch.Tensor:
    """LagKV's score of every token of partitions ``0 .. P-2`` of ``x`` (batch, heads, P * lag, dim).

    Partition ``p`` is min-max normalised per channel with the min and max of partition ``p + 1``; the
    token's score is the (unbiased) standard deviation over channels of the normalised vector, turned
    into a softmax over the ``lag`` tokens of its partition. A channel that is constant over the
    reference partition (max == min) is normalised to 0 instead of 0/0. Returns (batch, heads, P-1, lag).
    """
    b, h, n, d = x.shape
    parts = x.float().reshape(b, h, n // lag, lag, d)
    ref, cur = parts[:, :, 1:], parts[:, :, :-1]
    low = ref.amin(dim=-2, keepdim=True)
    span = ref.amax(dim=-2, keepdim=True) - low
    flat = span == 0
    normed = ((cur - low) / span.masked_fill(flat, 1.0)).masked_fill(flat, 0.0)
    return normed.std(dim=-1).softmax(dim=-1)


def compressed_length(n: int, sink: int, lag: int, keep: int) -> int:
    """Tokens LagKV holds after seeing ``n`` tokens, keeping ``keep`` per compressed partition."""
    if n < sink + 2 * lag:
        return n
    return sink + keep * ((n - sink) // lag - 1) + lag + (n - sink) % lag


class LagKVLayer(KVLayer):
    def __init__(self, method: "LagKV", layer_idx: int):
        super().__init__(method, layer_idx)
        #: tokens [0, base) are final: the sinks plus what earlier compressions kept
        self.base = method.params.sink_tokens
        #: tokens kept per compressed partition, fixed at the end of the first prefill step
        self.keep_per_partition: int | None = None

    def compress(self, phase: Phase) -> None:
        if self.keep_per_partition is None:
            self.keep_per_partition = self.method.keep_per_partition(self.seen)
        params = self.method.params
        lag, n = params.lag_size, self.get_seq_length()
        if n < self.base + 2 * lag:
            return
        parts = (n - self.base) // lag
        end = self.base + parts * lag
        scores = lag_relative_scores(self.keys[:, :, self.base:end], lag)
        scores = scores + params.score_v_ratio * lag_relative_scores(self.values[:, :, self.base:end], lag)
        top = scores.topk(self.keep_per_partition, dim=-1).indices  # (batch, heads, P-1, k)
        device = self.keys.device
        starts = self.base + lag * torch.arange(parts - 1, device=device)
        shape = self.keys.shape[:2]
        idx = torch.cat([
            torch.arange(self.base, device=device).expand(*shape, -1),
            (top + starts[:, None]).flatten(-2),
            torch.arange(end - lag, n, device=device).expand(*shape, -1),
        ], dim=-1)
        self.keep(idx)
        self.base += (parts - 1) * self.keep_per_partition


@register
class LagKV(Method):
    """LagKV as in the authors' code: recursive, lag-relative, attention-free. See the module docstring."""

    name = "lagkv"
    Params = LagKVParams
    layer = LagKVLayer
    phases = ("prefill", "append", "decode")
    ratio_note = (
        "LagKV never compresses the sink S, the last full partition and the remainder: an input shorter "
        "than S + 2L is not compressed at all, and a longer one holds S + k(floor((n-S)/L) - 1) + L + "
        "(n-S) mod L tokens with k = int(L/ratio) per partition, so the measured ratio is below the "
        "nominal one. In budget mode k is derived from the prompt so that the compressed prompt fits the "
        "budget where the sink and window allow; the cache then grows by k tokens per L during decoding."
    )

    def keep_per_partition(self, n_prompt: int) -> int:
        """Tokens kept per compressed partition (``int(r * L)`` with ``r = 1 / ratio``)."""
        sink, lag = self.params.sink_tokens, self.params.lag_size
        if self.compression.ratio is not None:
            return int(lag / self.compression.ratio)
        budget = self.compression.budget
        parts = (n_prompt - sink) // lag if n_prompt >= sink else 0
        if parts >= 2:
            fixed = sink + lag + (n_prompt - sink) % lag  # sink + window: never compressed
            return max(0, min(lag, (budget - fixed) // (parts - 1)))
        return min(lag, lag * budget // max(1, n_prompt))
