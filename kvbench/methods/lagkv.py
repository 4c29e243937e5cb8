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
* Budget mode (the paper is ratio-only) is a hard capacity: the cache holds at most ``B`` tokens after
  every step. The budget ``B`` is turned into the number ``k`` kept per partition, the largest
  ``k <= L`` for which the compressed prompt ``S + k (P - 1) + L + rem`` fits ``B`` (``k = L`` for a
  prompt too short to compress, ``P < 2``, which a feasible budget holds whole). ``k`` is then fixed; as the recursion keeps ``k`` more tokens per ``L`` generated, whenever the cache
  exceeds ``B`` the lowest-scoring compressed tokens (``[S, base)``, by the score that selected
  them) leave. The sink and the uncompressed window (up to ``2L - 1`` tokens) are never evicted, so
  a budget below ``S + 2L - 1`` cannot be held: it is a ConfigError naming that smallest feasible
  budget, raised when the method is built.

Chunked prefill (``prefill_chunk=N``) is the authors' second mode, ``inference_by_prefill_compress``
in their README: the prompt is fed in chunks and the cache compresses after each (use, then compress),
so the prefill never holds the whole prompt. The authors feed ``S + 2L`` tokens first and then ``L``
at a time; kvbench feeds ``N`` at a time from the start (``N = L`` is the closest), and the recursion
compresses whenever ``n >= base + 2L`` after a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import ConfigError
from kvbench.methods import register
from kvbench.methods.base import KVLayer, Method, Phase
from kvbench.params import param
from kvbench.storage import DenseStore


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

    def make_stores(self):
        stores = super().make_stores()
        if self.method.compression.budget is not None:
            # the score that kept each compressed token (what budget mode evicts by); 0 elsewhere
            stores["scores"] = DenseStore(bookkeeping=True)
        return stores

    def append(self, key_states, value_states) -> None:
        super().append(key_states, value_states)
        if "scores" in self.stores:
            self.stores["scores"].append(key_states.new_zeros(key_states.shape[:3], dtype=torch.float32))

    def compress(self, phase: Phase) -> None:
        if self.keep_per_partition is None:
            self.keep_per_partition = self.method.keep_per_partition(self.prompt_length())
        self.compress_partitions()
        budget = self.method.compression.budget
        if budget is not None and self.get_seq_length() > budget:
            self.evict_compressed(self.get_seq_length() - budget)

    def evict_compressed(self, count: int) -> None:
        """Drop the ``count`` lowest-scoring compressed tokens (``[S, base)``: the method's
        feasibility check guarantees that many exist)."""
        sink, n = self.method.params.sink_tokens, self.get_seq_length()
        scores = self.stores["scores"].tensor[:, :, sink:self.base]
        kept = scores.topk(self.base - sink - count, dim=-1).indices + sink
        shape, device = self.keys.shape[:2], self.keys.device
        self.keep(torch.cat([torch.arange(sink, device=device).expand(*shape, -1), kept,
                             torch.arange(self.base, n, device=device).expand(*shape, -1)], dim=-1))
        self.base -= count

    def compress_partitions(self) -> None:
        """LagKV's rule: compress every full partition that has a lag partition after it."""
        params = self.method.params
        lag, n = params.lag_size, self.get_seq_length()
        if n < self.base + 2 * lag:
            return
        parts = (n - self.base) // lag
        end = self.base + parts * lag
        scores = lag_relative_scores(self.keys[:, :, self.base:end], lag)
        scores = scores + params.score_v_ratio * lag_relative_scores(self.values[:, :, self.base:end], lag)
        # (batch, heads, P-1, k), in position order (keep() sorts anyway)
        top = scores.topk(self.keep_per_partition, dim=-1).indices.sort(dim=-1).values
        device = self.keys.device
        starts = self.base + lag * torch.arange(parts - 1, device=device)
        shape = self.keys.shape[:2]
        idx = torch.cat([
            torch.arange(self.base, device=device).expand(*shape, -1),
            (top + starts[:, None]).flatten(-2),
            torch.arange(end - lag, n, device=device).expand(*shape, -1),
        ], dim=-1)
        self.keep(idx)
        if "scores" in self.stores:  # the kept tokens now follow base, in position order like `top`
            kept_scores = scores.gather(-1, top).flatten(-2)
            self.stores["scores"].tensor[:, :, self.base:self.base + kept_scores.shape[-1]] = kept_scores
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
        "budget, and the lowest-scoring compressed tokens leave whenever the cache exceeds it."
    )

    @classmethod
    def budget_bounds(cls):
        return "budget (which must be >= sink_tokens + 2 x lag_size - 1)", "budget"

    def __init__(self, params: LagKVParams, compression, seed: int = 0):
        super().__init__(params, compression, seed)
        if compression is not None and compression.budget is not None:
            smallest = params.sink_tokens + 2 * params.lag_size - 1
            if compression.budget < smallest:
                raise ConfigError(
                    f"lagkv cannot hold budget {compression.budget}: it never evicts its {params.sink_tokens} sink "
                    f"tokens nor its uncompressed window (up to 2 x lag_size - 1 = {2 * params.lag_size - 1} "
                    f"tokens), so the smallest feasible budget is sink_tokens + 2 x lag_size - 1 = {smallest}; "
                    "give a larger budget or a smaller lag_size")

    def keep_per_partition(self, n_prompt: int) -> int:
        """Tokens kept per compressed partition (``int(r * L)`` with ``r = 1 / ratio``)."""
        sink, lag = self.params.sink_tokens, self.params.lag_size
        if self.compression.ratio is not None:
            return int(lag / self.compression.ratio)
        parts = (n_prompt - sink) // lag if n_prompt >= sink else 0
        if parts < 2:  # nothing to compress yet, and a feasible budget holds such a prompt whole
            return lag
        fixed = sink + lag + (n_prompt - sink) % lag  # sink + window: never compressed, <= budget
        return min(lag, (self.compression.budget - fixed) // (parts - 1))
