"""Attention scores shared by the attention-based methods (H2O, SnapKV, PyramidKV, TOVA, ...).

Everything here works on what ``KVLayer.observe`` receives: the step's queries (batch, q_heads,
q_len, head_dim) and the keys the step attends over (batch, kv_heads, kv_len, head_dim), the queries
being the *last* ``q_len`` of those ``kv_len`` tokens (bottom-right causal). It never asks the
attention kernel for its weights, so it works whatever kernel computes the step's attention output.

Scores are per KV head: the probabilities of the ``group = q_heads / kv_heads`` query heads sharing a
KV head are reduced by ``reduce`` ("mean" or "max") for every query, before any sum over queries.

Memory: the full ``n x n`` probability matrix of a prefill is never built.
:func:`attention_probs` is meant for a few queries (SnapKV's observation window, the current decode
query): O(q_len x n). :func:`accumulated_attention` (H2O's column sums over *all* prompt queries)
walks the queries in chunks of :data:`QUERY_CHUNK`, so it holds O(QUERY_CHUNK x n) probabilities per
layer at a time (batch x q_heads x 512 x n floats) while computing the exact same sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: queries per chunk in :func:`accumulated_attention` (bounds its memory, not its result)
QUERY_CHUNK = 512

REDUCTIONS = ("mean", "max")


def _probs(query: torch.Tensor, keys: torch.Tensor, scaling: float, first: int, reduce: str) -> torch.Tensor:
    """Softmax probabilities (batch, kv_heads, q, kv_len) of queries sitting at positions
    ``first .. first + q - 1`` of the key sequence (causal: a query sees keys up to itself)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    b, hq, q, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    grouped = query.reshape(b, hkv, hq // hkv, q, d).float()
    logits = torch.einsum("bhgqd,bhnd->bhgqn", grouped, keys.float()) * scaling
    q_pos = torch.arange(first, first + q, device=keys.device)[:, None]
    future = torch.arange(n, device=keys.device)[None, :] > q_pos
    probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
    return probs.mean(dim=2) if reduce == "mean" else probs.amax(dim=2)


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float, reduce: str = "mean") -> torch.Tensor:
    """Attention probabilities (batch, kv_heads, q_len, kv_len) of the step's queries, which are the
    last ``q_len`` tokens of ``keys``. Pass only the queries you need (``query[:, :, -w:]``)."""
    return _probs(query, keys, scaling, keys.shape[2] - query.shape[2], reduce)


def accumulated_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float, reduce: str = "mean",
                          chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """Sum over all the step's queries of their attention probabilities: (batch, kv_heads, kv_len).

    Computed ``chunk`` queries at a time so a long prefill never materialises its n x n matrix."""
    q_len, n = query.shape[2], keys.shape[2]
    total = keys.new_zeros(keys.shape[:3], dtype=torch.float32)
    for start in range(0, q_len, chunk):
        part = query[:, :, start:start + chunk]
        total += _probs(part, keys, scaling, n - q_len + start, reduce).sum(dim=2)
    return total


def window_scores(window_query: torch.Tensor, keys: torch.Tensor, scaling: float, kernel: int,
                  reduce: str = "mean") -> torch.Tensor:
    """SnapKV's scores (batch, kv_heads, kv_len - w) of the tokens before the observation window.

    ``window_query`` holds the last ``w`` queries of the sequence. Each earlier key gets the sum of
    the attention it receives from them (softmax over all keys, causal inside the window), smoothed
    by a 1-D average pooling of width ``kernel`` along the token axis (zero padding counted, as in
    SnapKV's ``F.avg_pool1d(..., padding=kernel // 2)``) so that neighbours of a hit are kept too."""
    w = window_query.shape[2]
    summed = attention_probs(window_query, keys, scaling, reduce)[..., : keys.shape[2] - w].sum(dim=2)
    if kernel <= 1 or summed.shape[-1] == 0:
        return summed
    b, h, n = summed.shape
    return F.avg_pool1d(summed.reshape(b * h, 1, n), kernel, stride=1, padding=kernel // 2).reshape(b, h, n)


def top_and_recent(scores: torch.Tensor, n: int, capacity: int, recent: int) -> torch.Tensor:
    """Indices (batch, heads, capacity) of the last ``recent`` of ``n`` tokens plus the
    ``capacity - recent`` best-scoring earlier ones; ``scores`` (batch, heads, >= n - recent) rates
    the earlier tokens (anything beyond ``n - recent`` is ignored). Ties go to ``torch.topk``."""
    recent = min(recent, capacity, n)
    older = n - recent
    top = scores[..., :older].topk(min(capacity - recent, older), dim=-1).indices
    window = torch.arange(older, n, device=scores.device).expand(*scores.shape[:2], recent)
    return torch.cat([top, window], dim=-1)


def last_queries(query: torch.Tensor, count: int) -> torch.Tensor:
    """A copy of the last ``count`` queries: a slice would keep the whole prefill query tensor alive
    until the layer's ``end_step``."""
    return query[:, :, -count:].clone()
