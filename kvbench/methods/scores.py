"""Attention scores shared by the attention-based methods (H2O, SnapKV, PyramidKV, TOVA, ...).

Everything here works on what ``KVLayer.observe`` receives: the step's queries (batch, q_heads,
q_len, head_dim) and the keys the step attends over (batch, kv_heads, kv_len, head_dim), the queries
being the *last* ``q_len`` of those ``kv_len`` tokens (bottom-right causal). It never asks the
attention kernel for its weights, so it works whatever kernel computes the step's attention output.

Scores are per KV head: the probabilities of the ``group = q_heads / kv_heads`` query heads sharing a
KV head are reduced by ``reduce`` ("mean" or "max") for every query, before any sum over queries.

Memory: the full ``n x n`` probability matrix of a prefill is never built.
:func:`attention_probs` is meant for a few queries (SnapKV's observation window, the current decode
query): O(q_len x n). :func:`attention_with_received` (H2O's and MiKV's sums over *all* the step's
queries) walks the queries in chunks of :data:`QUERY_CHUNK`, holding O(QUERY_CHUNK x n) probabilities
per layer at a time, and returns the step's attention output with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: queries per chunk in :func:`attention_with_received`: bounds its memory, not its result (64 and 128
#: were the fastest of 32-1024 on a 4k-token CPU prefill: small enough to stay in cache, large
#: enough for BLAS)
QUERY_CHUNK = 128

#: how the query heads of a GQA group are reduced; "none" keeps them: (batch, kv_heads, group, q, kv_len)
REDUCTIONS = ("mean", "max", "none")


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
    if reduce == "none":
        return probs
    return probs.mean(dim=2) if reduce == "mean" else probs.amax(dim=2)


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float, reduce: str = "mean") -> torch.Tensor:
    """Attention probabilities (batch, kv_heads, q_len, kv_len) of the step's queries, which are the
    last ``q_len`` tokens of ``keys`` ((batch, kv_heads, group, q_len, kv_len) with ``reduce="none"``).
    Pass only the queries you need (``query[:, :, -w:]``)."""
    return _probs(query, keys, scaling, keys.shape[2] - query.shape[2], reduce)


def attention_with_received(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                            chunk: int = QUERY_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal attention of the step and the attention every key received from it.

    Returns the output (batch, q_heads, q_len, head_dim) and, per KV head, the sum over all the step's
    queries of their probabilities (mean over the query heads of a GQA group): (batch, kv_heads, kv_len).
    Both come from the same probabilities, so a method that needs the sums (H2O, MiKV) pays for one
    attention instead of an attention plus a recomputation. The queries are walked in chunks of
    ``chunk``; each chunk multiplies only the keys it can see (causal), normalises in place and sums
    its probabilities with one matrix product weighted by the softmax normalisers.
    """
    b, hq, q_len, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    group = hq // hkv
    grouped = query.reshape(b, hkv, group, q_len, d).to(keys.dtype)
    keys_t = keys.transpose(-1, -2)  # (b, hkv, d, n): every head of a group multiplies the same keys
    out = torch.empty(b, hkv, group, q_len, values.shape[-1], dtype=values.dtype, device=values.device)
    received = torch.zeros(b, hkv, 1, n, dtype=torch.float32, device=keys.device)
    # a decoding step (one query) sees every key: no mask to build
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=keys.device).triu_(1) if q_len > 1 else None
    for start in range(0, q_len, chunk):
        part = grouped[:, :, :, start:start + chunk]
        c, end = part.shape[3], n - q_len + start + part.shape[3]  # keys this chunk's queries can see
        # the group's heads and the chunk's queries as the rows of one product (no broadcast copies)
        weights = torch.matmul(part.reshape(b, hkv, group * c, d), keys_t[..., :end]).float().mul_(scaling)
        if future is not None:
            weights.view(b, hkv, group, c, end)[..., end - c:].masked_fill_(future[:c, :c], float("-inf"))
        weights = weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()
        inverse_norm = weights.sum(dim=-1, keepdim=True).reciprocal_()  # (b, hkv, g * c, 1)
        chunk_out = torch.matmul(weights.to(values.dtype), values[:, :, :end]) * inverse_norm
        out[:, :, :, start:start + c] = chunk_out.view(b, hkv, group, c, -1)
        # sum over the group's heads and the chunk's queries of weights / norm, as one product
        received[..., :end] += torch.matmul(inverse_norm.transpose(-1, -2), weights)
    return out.reshape(b, hq, q_len, -1), received.squeeze(2) / group


def window_scores(window_query: torch.Tensor, keys: torch.Tensor, scaling: float, kernel: int,
                  reduce: str = "mean") -> torch.Tensor:
    """SnapKV's scores (batch, kv_heads, kv_len - w) of the tokens before the observation window.

    ``window_query`` holds the last ``w`` queries of the sequence. Each earlier key gets the sum of
    the attention it receives from them (softmax over all keys, causal inside the window), smoothed
    by a 1-D average pooling of width ``kernel`` along the token axis (zero padding counted, as in
    SnapKV's ``F.avg_pool1d(..., padding=kernel // 2)``) so that neighbours of a hit are kept too."""
    w = window_query.shape[2]
    return pool(attention_probs(window_query, keys, scaling, reduce)[..., : keys.shape[2] - w].sum(dim=2), kernel)


def pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D average pooling of width ``kernel`` along the last (token) axis of ``scores`` (..., n),
    zero padding counted (``F.avg_pool1d(..., padding=kernel // 2)``, as SnapKV and CAKE)."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    return F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2).reshape(scores.shape)


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


def recent_queries(previous: torch.Tensor | None, query: torch.Tensor, count: int) -> torch.Tensor:
    """The last ``count`` queries of the sequence: the step's, preceded by the ``previous`` steps'
    kept ones when the step has fewer (decoding steps, short prefill chunks)."""
    if previous is not None and query.shape[2] < count:
        query = torch.cat([previous, query], dim=2)
    return last_queries(query, count)
