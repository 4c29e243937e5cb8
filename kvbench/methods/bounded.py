"""Bounded cache: a predefined capacity that is never exceeded, with merging instead of eviction.

A **training-free variant** inspired by Yi et al. 2024 (arXiv 2411.15785, "Bounded-Cache Transformer").
The paper's models keep fixed-length key and value memories updated by *learned* projections (they
need training), and its update rule could not be read from any reachable source; nothing of it is
reproduced here. What this method takes from it is the idea of a memory whose size is fixed up front
and into which outgoing entries are folded rather than dropped.

Layout per layer and KV head, always ``[sinks | memory slots | recent window]``:

* capacity ``C``: the budget, or ``round(n / ratio)`` of the ``n``-token prompt; held after every
  step (prefill, appended question, decode). Within a step the new tokens are attended first
  (use, then compress), as for every kvbench method.
* ``sink_tokens`` first tokens (default 4) stay exact and are never merged into; the last ``window``
  tokens (default 32) stay exact. Both shrink for tiny capacities so that at least one memory slot
  exists (``sinks <= C - 1``, ``window <= C - 1 - sinks``).
* Until the cache is full, tokens leaving the window simply become memory slots (count 1). Once it
  is full, each token leaving the window is merged into the memory slot whose key is most similar
  (cosine similarity): ``k = (c k_slot + k_new) / (c + 1)``, the same for ``v``, ``c += 1``; more
  generally count-weighted. The merged slot keeps its original position (``positions``: the token
  that opened it). Keys are post-RoPE, so merging averages keys rotated at different positions:
  a heuristic, part of what this benchmark measures.
* The outgoing tokens of one step are merged in parallel, against the slots as they were before
  the step: identical to one-at-a-time merging during decoding (one outgoing token per step); for a
  prompt longer than the capacity, the first tokens after the sinks become the slots (as streaming
  insertion would make them) and the rest are merged into them without depending on their order.
* Each held token carries an int32 merge count; :meth:`BoundedLayer.bytes_held` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.methods import register
from kvbench.methods.base import EvictionLayer, Method, Phase
from kvbench.params import param
from kvbench.storage import DenseStore

#: outgoing tokens compared with the slots at a time (bounds the similarity matrix, not the result)
MERGE_CHUNK = 1024


@dataclass
class BoundedParams:
    #: first tokens kept exact and never merged into
    sink_tokens: int = param(4, ge=0)
    #: most recent tokens kept exact
    window: int = param(32, ge=0)


def merge_into_slots(slot_k, slot_v, slot_c, out_k, out_v, out_c):
    """Merge outgoing entries (b, h, a, d) with counts (b, h, a) into the slots (b, h, m, d) whose keys
    are most similar (cosine), by count-weighted averaging. Returns the new slot keys, values, counts."""
    b, h, m, d = slot_k.shape
    unit = F.normalize(slot_k.float(), dim=-1)
    target = torch.cat([
        (F.normalize(chunk.float(), dim=-1) @ unit.transpose(-1, -2)).argmax(-1)
        for chunk in out_k.split(MERGE_CHUNK, dim=2)
    ], dim=2)  # (b, h, a)
    weight = slot_c.float()
    total = weight.scatter_add(2, target, out_c.float())
    index = target[..., None].expand(-1, -1, -1, d)
    merged = []
    for slot, out in ((slot_k, out_k), (slot_v, out_v)):
        acc = (slot.float() * weight[..., None]).scatter_add(2, index, out.float() * out_c[..., None].float())
        merged.append((acc / total[..., None]).to(slot.dtype))
    return merged[0], merged[1], total.round().to(slot_c.dtype)


class BoundedLayer(EvictionLayer):
    def make_stores(self):
        # (b, h, n) int32: tokens merged into each held entry; real storage, counted in bytes_held
        return {**super().make_stores(), "counts": DenseStore()}

    @property
    def counts(self) -> torch.Tensor | None:
        return self.stores["counts"].tensor

    def append(self, key_states, value_states) -> None:
        super().append(key_states, value_states)
        self.stores["counts"].append(torch.ones(key_states.shape[:3], dtype=torch.int32, device=key_states.device))

    def layout(self) -> tuple[int, int, int]:
        """(sinks, memory slots, window) for this layer's capacity."""
        params, cap = self.method.params, self.capacity
        sinks = min(params.sink_tokens, cap - 1)
        window = min(params.window, cap - 1 - sinks)
        return sinks, cap - sinks - window, window

    def compress(self, phase: Phase) -> None:
        n = self.get_seq_length()
        if n <= self.capacity:
            return
        sinks, memory, window = self.layout()
        end = sinks + memory
        slots, out = slice(sinks, end), slice(end, n - window)
        merged = merge_into_slots(
            self.keys[:, :, slots], self.values[:, :, slots], self.counts[:, :, slots],
            self.keys[:, :, out], self.values[:, :, out], self.counts[:, :, out])
        # in place: the slots take their merged entries, the recent window moves down behind them and
        # the store is cut there (a slot keeps the position of the token that opened it)
        for name, slot_entries in zip(("keys", "values", "counts", "positions"), (*merged, None)):
            store = self.stores[name]
            held = store.tensor
            if slot_entries is not None:
                held[:, :, slots] = slot_entries
            held[:, :, end:end + window] = held[:, :, n - window:].clone()
            store.truncate(end + window)


@register
class Bounded(Method):
    """Training-free bounded cache (predefined capacity, merge on overflow); see the module docstring."""

    name = "bounded"
    Params = BoundedParams
    layer = BoundedLayer
    phases = ("prefill", "append", "decode")
    approximation_note = (
        "Once full, tokens leaving the window are merged into the most similar slot: held entries are "
        "count-weighted averages of several tokens, not original tokens."
    )
    ratio_note = (
        "Holds exactly the capacity in tokens once full, but every held entry also stores an int32 merge "
        "count, which bytes_held includes: the measured ratio is slightly below nominal."
    )
