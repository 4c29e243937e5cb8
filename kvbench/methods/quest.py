"""Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
arXiv 2406.10774; code mit-han-lab/Quest: ``evaluation/quest_attention.py``, the accuracy
evaluation, and ``quest/utils/controller.py``, the kernels' page budget)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods import register
from kvbench.methods.base import EvictionLayer, Method
from kvbench.params import param


@dataclass
class QuestParams:
    #: tokens per page (Quest's chunk_size / page_size: 16)
    page_size: int = param(16, ge=1)
    #: the first layers of the model attend over every page (Quest skips layers 0 and 1)
    dense_layers: int = param(2, ge=0)


def page_bounds(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel minimum and maximum key (batch, heads, pages, d) of every page of ``page_size``
    consecutive held tokens (the last page may be partial)."""
    n = keys.shape[2]
    whole = n // page_size * page_size
    pages = keys[:, :, :whole].unflatten(2, (-1, page_size))
    lo, hi = [pages.amin(dim=3)], [pages.amax(dim=3)]
    if whole < n:
        lo.append(keys[:, :, whole:].amin(dim=2, keepdim=True))
        hi.append(keys[:, :, whole:].amax(dim=2, keepdim=True))
    return torch.cat(lo, dim=2), torch.cat(hi, dim=2)


def upper_bounds(query: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Quest's bound on ``q . k`` over a page: ``sum_c max(q_c min_c, q_c max_c)``.

    ``query`` (batch, kv_heads, group, d): one decoding query per query head, grouped by KV head;
    ``lo``, ``hi`` (batch, kv_heads, pages, d). Returns (batch, kv_heads, group, pages)."""
    q = query.float()[:, :, :, None, :]
    return torch.maximum(q * lo.float()[:, :, None], q * hi.float()[:, :, None]).sum(dim=-1)


class QuestLayer(EvictionLayer):
    """Holds every token (``capacity`` is the token budget of a decoding step, not a bound on what
    is held). Page minima and maxima are kept per KV head for the pages held so far and refreshed
    from the first page that changed; they are the method's bookkeeping, not KV bytes."""

    state_fields = EvictionLayer.state_fields + ("page_min", "page_max")

    def __init__(self, method, layer_idx):
        super().__init__(method, layer_idx)
        self.page_min = self.page_max = None
        self.read_bytes: int | None = None  # what the last step read, when it read fewer pages than held

    def pages_of(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds of every page of ``keys`` (all held tokens), recomputed from the last page known."""
        size = self.method.params.page_size
        known = 0 if self.page_min is None else self.page_min.shape[2] - 1  # the last may have grown
        lo, hi = page_bounds(keys[:, :, known * size:], size)
        if known:
            lo, hi = torch.cat([self.page_min[:, :, :known], lo], 2), torch.cat([self.page_max[:, :, :known], hi], 2)
        self.page_min, self.page_max = lo, hi
        return lo, hi

    def attend(self, query, keys, values, scaling, sliding_window):
        self.read_bytes = None
        if query.shape[2] != 1 or self.capacity is None or self.layer_idx < self.method.params.dense_layers:
            return None  # the prefill, an appended question, a dense layer: exact attention
        size = self.method.params.page_size
        n = keys.shape[2]
        pages = -(-n // size)
        budget = max(1, self.capacity // size)  # pages read, the last (current) one included
        if pages <= budget:
            return None  # every page fits the budget: exact attention
        lo, hi = self.pages_of(keys)
        b, hq, _, d = query.shape
        hkv = keys.shape[1]
        grouped = query.reshape(b, hkv, hq // hkv, d)
        # the last page is always read; the others by their bound, per query head
        top = upper_bounds(grouped, lo[:, :, :-1], hi[:, :, :-1]).topk(budget - 1, dim=-1).indices
        chosen = torch.zeros(b, hkv, hq // hkv, pages, dtype=torch.bool, device=keys.device)
        chosen.scatter_(-1, top, True)[..., -1] = True
        visible = chosen.repeat_interleave(size, dim=-1)[..., :n]
        logits = torch.einsum("bhgd,bhnd->bhgn", grouped.float(), keys.float()) * scaling
        probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out = torch.einsum("bhgn,bhnd->bhgd", probs, values.float()).to(values.dtype)
        # bytes read: every KV head loads the union of its query heads' pages, and the bounds of
        # every page but the last
        tokens = visible.any(dim=2).sum().item()
        item = keys.element_size()
        self.read_bytes = tokens * (keys.shape[-1] + values.shape[-1]) * item + b * hkv * (pages - 1) * 2 * d * item
        return out.reshape(b, hq, 1, -1)

    def bytes_read(self) -> int:
        return super().bytes_read() if self.read_bytes is None else self.read_bytes


@register
class Quest(Method):
    """Quest: query-aware page selection at every decoding step, over the full cache.

    - The cache keeps every token. It is split into pages of ``page_size`` consecutive tokens, with
      the per-channel minimum and maximum key of every page (per KV head).
    - At a decoding step the current query ``q`` bounds each page's logits by
      ``sum_c max(q_c min_c, q_c max_c)`` (:func:`upper_bounds`), and attention runs over the tokens
      of the ``budget_pages - 1`` pages with the highest bounds plus the last page (which holds the
      current token), as the kernels' controller does; ``budget_pages = token budget // page_size``
      (at least 1). Quest's evaluation code differs slightly (top ``max(3, budget // page_size)``
      pages, the last one not forced in); the kernels' rule is the one its speed figures measure.
      Pages are chosen per query head, as in Quest's evaluation code, so a KV head loads the union
      of its query heads' pages: with grouped-query attention a step may read up to ``group``
      times the budget (SmolLM2-135M, 3 query heads per KV head, at ratio 4 on 1k-token passkeys:
      47% of the full cache per step, not 25%).
    - Dense where Quest is: the prefill and an appended question (steps of more than one query),
      the first ``dense_layers`` layers of the model (Quest skips layers 0 and 1, counted over
      all layers), and steps whose cache has no more pages than the budget.
    - Token budget: the compression setting. ``budget=B`` is Quest's ``token_budget`` itself;
      ``ratio=r`` makes it ``round(n / r)`` for an ``n``-token prompt, fixed when the prompt is in,
      like every other method's capacity.

    Its gain is bandwidth, not capacity: the full cache stays in memory (``bytes_held`` equals the
    full cache; the page bounds are bookkeeping, like H2O's scores), while each decoding step reads
    only the chosen pages and the bounds. Records carry that as ``kv.decode_bytes_read`` (mean bytes
    a decoding step read from the cache, every layer together, dense layers included).
    """

    name = "quest"
    Params = QuestParams
    layer = QuestLayer
    ratio_note = ("Quest keeps the whole cache (measured ratio 1): its ratio or budget sets the tokens a "
                  "decoding step reads (kv.decode_bytes_read), not what is held")
    approximation_note = "each decoding step attends over the chosen pages only"
    budget_unit = "tokens a decoding step reads (not a capacity)"
    budget_is_capacity = False

    @classmethod
    def budget_bounds(cls) -> tuple[str, str]:
        return "every token", "every token"
