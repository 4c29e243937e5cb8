"""G-KV (Liao et al. 2025, arXiv 2512.00504; code microsoft/G-KV, ``gkv/model/compression/score_based.py``).

Decoding-time eviction with a global (historical) score, for long generations. Compression events
happen right after the prefill (generated count 0) and then every ``divide_length`` generated tokens,
and only when the cache is longer than the budget; between events the cache grows by one token per
step, so it swings between ``budget`` and ``budget + divide_length - 1`` tokens.

At an event, with ``Q_w`` the last ``w`` post-RoPE queries of the layer (a small query cache filled by
``observe``) and ``K`` the ``n`` held keys:

- ``A = softmax(Q_w K^T * scaling)``, causal inside the window, max over the query heads of each GQA
  group; the last ``w`` key columns (the window itself) are dropped; ``local`` = mean over the ``w``
  queries, divided by its max (per batch and KV head).
- ``F = max(alpha * F_prev, local)`` for tokens with a stored score, ``F = local`` for the others.
- ``red`` (from R-KV): softmax over all ``n`` keys of the mean cosine similarity of each key to the
  others, where every key's most recent near-duplicate (cos > ``similarity_threshold``) escapes that
  key's penalty; the window columns are dropped and the rest divided by its max.
- ``s = lambda * F - (1 - lambda) * red``; the layer keeps the top ``budget - w`` tokens by ``s`` plus
  the last ``w``, and stores ``F`` (not ``s``) of the top tokens. The window tokens get no stored
  score (their columns were dropped), so at the next event their ``F`` is the local score - as in
  the authors' code, whose score cache covers only the compressed front of the cache.

Choices and differences (documented, all small):

- kvbench is use-then-compress: the step that triggers an event attends over the uncompressed cache
  and the compressed one serves later steps. The authors compress inside the forward of steps
  0, D, 2D, ... (before attention); here the event follows steps 0 (the prefill), D, 2D, ... . The
  cache sizes between steps are the same.
- ``softmax`` uses the model's own attention scaling (``1/sqrt(head_dim)`` for Llama-style models,
  which is the authors' choice), so models with another query scale are scored as they attend.
- The authors compress when the cache holds ``>= budget`` tokens (re-scoring a full cache); the
  methods reference says "longer than the budget": a cache of exactly ``budget`` tokens is left alone.
- Redundancy follows R-KV's reference implementation (``cal_similarity_raw``: per key, zero the
  similarity to its *last* near-duplicate, mean over the n rows, softmax), computed in blocks so
  the n x n matrix is never held (:func:`redundancy`). Two quirks are not copied: a key with no
  near-duplicate does not zero its similarity to token 0 (R-KV's ``max`` of all-zero indices), and
  the authors' Triton kernel's per-64-column-block duplicate search is replaced by the per-row one
  it approximates.
- An appended question (phase ``append``, ``compress: context``) is added uncompressed, as the phase
  promises, and is not a generated token: the cache then holds up to ``budget + question +
  divide_length - 1`` tokens until the first decoding event.
- A budget not above the window (short prompts at high ratios) shrinks the window to the budget
  (the last ``budget`` tokens are kept); the authors assert ``budget > window``.
- The RL / distillation fine-tuning of the paper is out of scope (training-free benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods import register
from kvbench.methods.base import KVLayer, Method, Phase
from kvbench.params import param
from kvbench.methods.scores import attention_probs, last_queries, top_and_recent
from kvbench.storage import gather_tokens

#: rows and columns of the key-similarity matrix computed at a time in :func:`redundancy`: bounds
#: memory, not the result (256 was the fastest of 128-512 at 4k tokens on CPU)
REDUNDANCY_CHUNK = 256


@dataclass
class GKVParams:
    #: w: the last w queries score the cache and the last w tokens are always kept (authors' recipe 16)
    window: int = param(16, ge=1)
    #: compression every divide_length generated tokens (and right after the prefill)
    divide_length: int = param(128, ge=1)
    #: decay of the stored global score at each event (F = max(alpha * F_prev, local))
    alpha: float = param(0.8, ge=0, le=1)
    #: lambda: weight of the global attention score against the redundancy term
    mix_lambda: float = param(0.5, ge=0, le=1)
    #: cosine similarity above which two keys count as near-duplicates (R-KV's 0.5)
    similarity_threshold: float = param(0.5, ge=-1, le=1)


def local_scores(window_query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """G-KV's local score (batch, kv_heads, n - w) of the tokens before the window of the last ``w``
    queries: attention probabilities (max over the query heads of a group), mean over the window's
    queries, divided by its max."""
    w = window_query.shape[2]
    local = attention_probs(window_query, keys, scaling, reduce="max")[..., : keys.shape[2] - w].mean(dim=2)
    # softmax probabilities are > 0, so the max is too unless everything underflowed
    return local / local.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(local.dtype).tiny)


def redundancy(keys: torch.Tensor, threshold: float = 0.5, chunk: int = REDUNDANCY_CHUNK) -> torch.Tensor:
    """R-KV's redundancy (batch, kv_heads, n) of every key: softmax over the n keys of
    ``mean_i cos(k_i, k_j)`` with ``cos(k_j, k_j)`` and, for every key ``i``, the similarity to its most
    recent near-duplicate (largest ``j != i`` with cosine above ``threshold``) set to 0 - so the latest
    copy of a repeated key is penalised least.

    The column sums need no similarity matrix: ``sum_i cos(k_i, k_j) = u_j . sum_i u_i`` for unit keys
    ``u``. Only the near-duplicate search compares keys pairwise: ``chunk`` rows at a time against
    ``chunk`` columns at a time, newest columns first, until every row of the chunk has found its latest
    near-duplicate. Keys of real prompts mostly have one among the newest tokens, so this usually
    scans a few blocks instead of all ``n`` columns; the result is the same either way."""
    unit = keys.float()
    unit = unit / (unit.norm(dim=-1, keepdim=True) + 1e-8)
    n = unit.shape[2]
    total = (unit @ unit.sum(dim=2).unsqueeze(-1)).squeeze(-1) - unit.pow(2).sum(dim=-1)  # diagonal out
    # column j + 1 where key j is a near-duplicate, so that a row's max is its latest one (0: none)
    numbered = torch.arange(1, chunk + 1, dtype=torch.int32, device=keys.device)
    for start in range(0, n, chunk):
        rows = unit[:, :, start:start + chunk]
        end = start + rows.shape[2]
        latest = torch.full(rows.shape[:3], -1, dtype=torch.long, device=keys.device)  # -1: none found yet
        latest_sim = torch.zeros(rows.shape[:3], dtype=torch.float32, device=keys.device)
        for stop in range(n, 0, -chunk):
            first = max(0, stop - chunk)
            sim = rows @ unit[:, :, first:stop].transpose(-1, -2)  # (b, h, c, stop - first)
            a, z = max(start, first), min(end, stop)
            if a < z:  # cos(k_i, k_i) is no near-duplicate
                sim[..., a - start:z - start, a - first:z - first].diagonal(dim1=-2, dim2=-1).zero_()
            last = ((sim > threshold) * numbered[: stop - first]).amax(dim=-1) - 1  # (b, h, c), -1: none
            new = (latest < 0) & (last >= 0)
            latest = torch.where(new, first + last, latest)
            latest_sim = torch.where(new, sim.gather(-1, last.clamp_min(0).unsqueeze(-1)).squeeze(-1), latest_sim)
            if bool((latest >= 0).all()):
                break
        # every row's similarities, less the one to its latest near-duplicate (0 where it has none)
        total.scatter_add_(-1, latest.clamp_min(0), -latest_sim)
    return (total / n).softmax(dim=-1)


class GKVLayer(KVLayer):
    """Not an ``EvictionLayer``: its capacity is not a bound between steps (the cache grows up to
    ``budget + divide_length - 1`` tokens between events), so it keeps ``budget`` instead."""

    state_fields = KVLayer.state_fields + ("queries", "scaling", "global_score", "generated", "budget")

    def __init__(self, method: "GKV", layer_idx: int):
        super().__init__(method, layer_idx)
        self.queries: torch.Tensor | None = None  # the last w queries (batch, q_heads, <= w, head_dim)
        self.scaling = 1.0
        #: F of the first global_score.shape[-1] held tokens (the ones kept by score at the last event)
        self.global_score: torch.Tensor | None = None
        self.generated = 0  # decoding steps so far: events when it is a multiple of divide_length
        self.budget: int | None = None  # tokens per head after an event, fixed once the prompt is in

    def observe(self, query, keys, scaling):
        w = self.method.params.window
        if self.queries is not None and query.shape[2] < w:
            query = torch.cat([self.queries, query], dim=2)
        self.queries, self.scaling = last_queries(query, w), scaling

    def compress(self, phase: Phase) -> None:
        # not called after an appended question ("append" is not among the phases): it stays
        # uncompressed and is no generated token
        if self.budget is None:
            self.budget = self.method.compression.capacity(self.seen)
        if phase == "decode":
            self.generated += 1
        if self.generated % self.method.params.divide_length == 0 and self.get_seq_length() > self.budget:
            self.evict()

    def evict(self) -> None:
        """A compression event: keep the window and the top ``budget - w`` tokens by score."""
        params, n, budget = self.method.params, self.get_seq_length(), self.budget
        # the last w queries are the queries of the last w held tokens: the window is always kept, and
        # every token since the last event is held
        w = min(params.window, budget, self.queries.shape[2])
        local = local_scores(self.queries[:, :, self.queries.shape[2] - w:], self.keys, self.scaling)
        score = local.clone()
        if self.global_score is not None:
            m = min(self.global_score.shape[-1], n - w)
            score[..., :m] = torch.maximum(params.alpha * self.global_score[..., :m], local[..., :m])
        mixed = score
        if params.mix_lambda < 1:  # lambda = 1 needs no redundancy (and skips its pairwise work)
            red = redundancy(self.keys, params.similarity_threshold)[..., : n - w]
            red = red / red.amax(dim=-1, keepdim=True)  # softmax values: > 0
            mixed = params.mix_lambda * score - (1 - params.mix_lambda) * red
        idx = top_and_recent(mixed, n, budget, w)
        top = idx[..., : budget - w].sort(dim=-1).values
        # keep() sorts by position: the top tokens (all before the window) become the cache's front,
        # which is what global_score describes
        self.global_score = gather_tokens(score, top)
        self.keep(idx)


@register
class GKV(Method):
    """G-KV: decoding-time eviction by a decayed global attention score minus key redundancy (see the
    module docstring). The capacity (budget, or ``round(n / ratio)`` of the prompt) is the cache size
    right after each compression event, window included."""

    name = "gkv"
    Params = GKVParams
    layer = GKVLayer
    phases = ("prefill", "decode")
    ratio_note = ("the capacity (round(n / ratio), or the budget) is what the cache holds right after a "
                  "compression event; events happen after the prefill and every divide_length generated "
                  "tokens, so during decoding the cache swings between budget and budget + divide_length - 1 "
                  "tokens (plus an appended question until the first event) and the measured ratio is lower "
                  "than nominal between events; a prompt not longer than the budget is not compressed (ratio 1)")
