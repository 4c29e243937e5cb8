"""AdaKV: head-wise adaptive budgets over any score-based method (see :class:`AdaKV`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import ragged_attention
from kvbench.methods import register, registered
from kvbench.methods.base import MethodOverBase, ScoreKeepLayer
from kvbench.params import param
from kvbench.storage import DenseStore, flatten_heads, pad_segments, segment_counts, segment_ids


@dataclass
class AdaKVParams:
    #: the method whose scores are compared across heads (a score-based method that compresses the prefill)
    base: str = param("snapkv")
    #: share of the capacity every head keeps whatever its scores (kvpress's ``alpha_safeguard``)
    alpha_safeguard: float = param(0.2, ge=0, le=1)


def adakv_bases() -> list[str]:
    """The methods AdaKV can use as its base: score-and-keep methods that compress only the prefill
    and hold their heads at equal lengths (not ChunkKV, whose choice is not a per-token score)."""
    return sorted(name for name, cls in registered().items()
                  if issubclass(cls.layer, ScoreKeepLayer) and cls.phases == ("prefill",)
                  and not cls.layer.ragged_heads and name != "chunkkv")


def head_allocation(scores: torch.Tensor, heads: torch.Tensor, n_heads: int, kept: int,
                    alpha_safeguard: float) -> torch.Tensor:
    """Indices (batch, n_heads * kept) of the tokens AdaKV keeps of ``scores`` (batch, N), the tokens
    of ``n_heads`` heads together (``heads`` (batch, N): each token's head), higher = better.

    Every head's ``int(kept * alpha_safeguard)`` best tokens are kept (the safeguard); the other
    places go to the best scores of the whole row, whatever their head, so a head whose scores are
    high keeps more than ``kept`` and another fewer. Ties go to the earlier token. A row of at most
    ``n_heads * kept`` tokens is kept whole."""
    total = n_heads * kept
    if scores.shape[-1] <= total:
        return torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    by_score = scores.argsort(dim=-1, descending=True, stable=True)
    grouped = by_score.gather(-1, heads.gather(-1, by_score).argsort(dim=-1, stable=True))  # by head, best first
    counts = torch.zeros(*heads.shape[:-1], n_heads, dtype=torch.long, device=heads.device)
    counts.scatter_add_(-1, heads, torch.ones_like(heads))
    first = (counts.cumsum(-1) - counts).gather(-1, heads.gather(-1, grouped))  # where each token's head starts
    rank = torch.arange(scores.shape[-1], device=scores.device) - first  # within its head, 0 = best
    safe = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, grouped, rank < int(kept * alpha_safeguard))
    ranked = scores.float().masked_fill(safe, float("inf"))
    return ranked.argsort(dim=-1, descending=True, stable=True)[..., :total]


class AdaKVLayer(ScoreKeepLayer):
    """Mixed into the base's layer class (``AdaKV.__init__``): the base's ``score``, AdaKV's choice.

    Until it first evicts, the layer holds the base's uniform (batch, heads, n) stores; the eviction
    moves every store to the flat layout of ``kvbench.storage`` with a ``segments`` store, where each
    head holds its own number of tokens and attention runs with ``cache.ragged_attention``."""

    ragged_heads = True
    alpha_safeguard: float

    def make_stores(self):
        return {**super().make_stores(), "segments": DenseStore(bookkeeping=True)}

    @property
    def is_flat(self) -> bool:
        return self.stores["segments"].tensor is not None

    @property
    def positions(self) -> torch.Tensor | None:
        """(batch, heads, m) positions of the held tokens, in the flat layout padded with -1 to the
        longest head (m)."""
        if not self.is_flat:
            return super().positions
        b, h = self.kv_shape[:2]
        return pad_segments(self.stores["positions"].tensor, self.stores["segments"].tensor, b, h, -1)

    def tokens_held(self) -> torch.Tensor:
        if not self.is_flat:
            return super().tokens_held()
        b, h = self.kv_shape[:2]
        return segment_counts(self.stores["segments"].tensor, b * h).view(b, h).cpu()

    def get_seq_length(self) -> int:
        """Tokens held per head; in the flat layout the mean over heads (every batch row holds the same
        total, a whole number of tokens per head), the unit of the budget."""
        if not self.is_flat:
            return super().get_seq_length()
        b, h = self.kv_shape[:2]
        return self.stores["keys"].tokens // (b * h)

    def append(self, key_states, value_states):
        if not self.is_flat:
            return super().append(key_states, value_states)
        b, h, q, _ = key_states.shape
        position = torch.arange(self.seen, self.seen + q, device=key_states.device).repeat(b * h)[None, None]
        for name, new in (("keys", flatten_heads(key_states)), ("values", flatten_heads(value_states)),
                          ("positions", position), ("segments", segment_ids(b, h, q, key_states.device))):
            self.stores[name].append(new)
        self.seen += q

    def attend(self, query, keys, values, scaling, sliding_window):
        if not self.is_flat:
            return super().attend(query, keys, values, scaling, sliding_window)
        return ragged_attention(query, keys, values, self.stores["segments"].tensor, self.stores["positions"].tensor,
                                self.kv_shape[1], self.seen - query.shape[2], scaling)

    def token_scores(self, n: int, scores: torch.Tensor) -> torch.Tensor:
        """The base's ``scores`` (batch, heads or 1, m <= n) of ``n`` tokens as (batch, heads, n): the
        tokens past the m scored are those the base always keeps (SnapKV's window), scored +inf."""
        b, h = self.kv_shape[:2]
        scores = scores.float().expand(b, h, -1)
        if not self.keep_highest:  # KNorm keeps its lowest scores
            scores = -scores
        return torch.cat([scores, scores.new_full((b, h, n - scores.shape[-1]), float("inf"))], dim=-1)

    def flat_scores(self) -> torch.Tensor:
        """The base's score (T,) of every token of the flat layout, each head scored by the base over
        its own tokens only, as if it were the whole cache (a (batch, heads) view repeating them)."""
        b, h = self.kv_shape[:2]
        segments = self.stores["segments"].tensor[0, 0]
        held, out = self.stores, torch.empty(segments.shape, device=segments.device)
        try:
            for segment in range(b * h):
                idx = (segments == segment).nonzero().squeeze(1)  # in held order: position order
                parts = {name: store.tensor[:, :, idx] for name, store in held.items()}
                self.stores = {name: DenseStore.holding(part.expand(b, h, *part.shape[2:])) for name, part in parts.items()}
                out[idx] = self.token_scores(len(idx), self.score())[segment // h, segment % h].to(out.device)
        finally:
            self.stores = held
        return out

    def evict(self) -> None:
        """Keep AdaKV's head-wise choice (:func:`head_allocation`) of ``kept_tokens()`` per head on
        average, moving the stores to the flat layout the first time."""
        b, h = self.kv_shape[:2]
        device = self.keys.device  # scores may be on another device (random's CPU generator)
        if not self.is_flat:
            n = self.get_seq_length()
            scores = self.token_scores(n, self.score()).reshape(b, h * n).to(device)
            for store in self.stores.values():
                store.to_flat_layout()
            self.stores["segments"].set(segment_ids(b, h, n, device))
            rows = torch.arange(b * h * n, device=device).view(b, h * n)
        else:  # every batch row holds the same number of tokens, interleaved by the appends
            scores = self.flat_scores()
            rows = (self.stores["segments"].tensor[0, 0] // h).argsort(stable=True).view(b, -1)
            scores = scores[rows]
        heads = self.stores["segments"].tensor[0, 0][rows] % h
        chosen = rows.gather(-1, head_allocation(scores, heads, h, self.kept_tokens(), self.alpha_safeguard))
        self.keep(chosen.reshape(1, 1, -1))


@register
class AdaKV(MethodOverBase):
    """AdaKV (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation",
    arXiv 2407.11550; code FFY0/AdaKV and kvpress's ``AdaKVPress``): head-wise budgets over any
    score-based method.

    ``method=adakv method.base=snapkv``: the base method (a registered method whose layer is a
    ``ScoreKeepLayer`` and that compresses only the prefill) scores the prompt's tokens with its own
    default parameters; instead of every KV head keeping its own top ``capacity``, a layer keeps the
    ``heads x capacity`` best scores of all its heads together (the scores flattened over (head,
    token)), so heads whose attention is concentrated give places to heads whose attention is spread.
    Every head first keeps its ``int(alpha_safeguard x capacity)`` best tokens (the safeguard,
    kvpress's rule and default 0.2; the authors' README example sets their ``floor_alpha`` to 0.5,
    ``method.alpha_safeguard=0.5``). A base that scores only the tokens before a window it always
    keeps (SnapKV, PyramidKV) keeps that window in every head (scored above every other token; kvpress
    pads it with the layer's best score). A base that keeps its lowest scores (KNorm) is negated.
    Ties go to the earlier token.

    Capacity: ``budget`` (and ``round(n / ratio)``) is the mean number of tokens per KV head, so a
    layer holds ``heads x capacity`` tokens per sequence, shared unevenly between its heads; per-layer
    shares of the base (PyramidKV) are kept. The authors' code gives each head a floor of
    ``int(alpha x capacity)`` plus ``(1 - alpha)`` of its share of the flattened top-k, rounded, whose
    total may differ from ``heads x capacity`` by a few tokens; kvpress's form, used here, holds it
    exactly. Records count truthfully: tokens held are the mean over heads (the budget's unit), the
    peak tokens held the largest head's (above the budget when a head takes more than its share), and
    the bytes held those of the tokens stored.

    Storage: kvpress only masks the evicted keys, so its cache does not shrink. Here, as in the
    authors' flattened cache, every head holds only its own tokens (the flat layout of
    ``kvbench.storage``: the tokens of all heads in one tensor, with their head and position), so the
    bytes held are the ragged size and a decoding step attends, per head, over that head's tokens only
    (``cache.ragged_attention``, one SDPA call over the held tokens with a per-head mask, where the
    authors call ``flash_attn_varlen_func``). The authors keep each head's tokens contiguous and copy
    the cache into a new one at every decoding step; here a step's tokens are appended after the
    held ones (one per head, into spare room), so a head's tokens are not contiguous. The masked call
    computes every query row's logits against every held token, the KV heads' count times dense
    attention's arithmetic (reading each held byte once); a step with many queries after the first
    eviction (a prefill chunk) also holds a (query heads x queries) x held-tokens boolean mask. Until
    the first eviction the layer holds the base's uniform stores, so a prompt shorter than the
    capacity runs exactly as the full cache. ``positions`` reads back (batch, heads, longest head)
    with -1 where a head holds fewer tokens; ``get_seq_length`` is the mean per head.

    Phases: compresses the prefill (after every chunk of a chunked prefill); in ratio mode an appended
    question and the decoded tokens are added uncompressed, one per head per step. Budget mode (a hard
    capacity): after an appended question or a decoding step, once the layer holds ``evict_every``
    tokens per head more than the budget on average, the base scores every held token again, each head
    over its own tokens (as the base re-scores a uniform cache), and the same allocation keeps
    ``heads x budget``; so a layer holds at most ``heads x (budget + evict_every - 1)`` tokens, one
    head possibly more than the budget and another fewer. This re-scoring runs the base once per
    (batch row, KV head), each time over a (batch, heads) view of that head's tokens, so it costs
    about the heads' count times the base's own re-scoring.
    """

    name = "adakv"
    Params = AdaKVParams
    layer = AdaKVLayer
    phases = ("prefill",)
    budget_unit = "tokens, mean over the layer's KV heads (per-head shares by score)"

    @classmethod
    def bases(cls) -> list[str]:
        return adakv_bases()

    def layer_attributes(self, params):
        return {"alpha_safeguard": params.alpha_safeguard}
