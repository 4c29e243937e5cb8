"""kvbench's KV cache and attention path.

:class:`KVCache` is a transformers ``Cache`` whose layers are the method's :class:`KVLayer` objects
(sliding-window layers get :class:`SlidingWindowLayer`, whatever the method). Models run with the
attention implementation ``"kvbench"`` (registered here): it hands the step's queries to the layer
(``observe``), lets the layer compute the output itself (``attend``), and otherwise runs exact SDPA
with a mask built from the layer's own length. Building the mask per layer is what lets layers hold different numbers of tokens
(PyramidKV, sliding layers) after compression. Layers whose heads hold different numbers of tokens
(the flat layout of ``kvbench.storage``) attend with :func:`ragged_attention`.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from kvbench.methods.base import KVLayer, Method, Phase, layer_windows

ATTN_IMPLEMENTATION = "kvbench"

#: how kvbench treats sliding-window layers (Gemma 3's local layers), whatever the method: recorded
#: with runs as a policy of the harness, not as part of a method's identity
SLIDING_WINDOW_POLICY = "not compressed (window-bounded cache kept as the full cache does)"

_active: contextvars.ContextVar["KVCache | None"] = contextvars.ContextVar("kvbench_cache", default=None)

__all__ = ["ATTN_IMPLEMENTATION", "SLIDING_WINDOW_POLICY", "KVCache", "SlidingWindowLayer", "kvbench_attention",
           "layer_attention", "layer_windows", "ragged_attention"]


class SlidingWindowLayer(KVLayer):
    """A sliding-window attention layer (Gemma 3's local layers): its cache is bounded already.

    kvbench's policy (:data:`SLIDING_WINDOW_POLICY`): methods do not compress these layers (as
    kvpress does for Gemma 3); the layer keeps the last ``window - 1`` tokens after each step, exactly
    as transformers' own sliding-window cache, and the full-cache baseline holds the same, so bytes
    stay comparable.
    """

    is_sliding = True

    def __init__(self, window: int, layer_idx: int = 0):
        super().__init__(None, layer_idx)
        self.window = window

    def end_step(self, phase: Phase) -> None:
        n = self.get_seq_length()
        if n >= self.window:
            for store in self.stores.values():
                store.keep_last(self.window - 1)

    def full_tokens(self) -> int:
        return min(self.seen, self.window - 1)


class KVCache(Cache):
    """One sample's cache: a method layer per global-attention layer, a window layer per local one."""

    def __init__(self, method: Method, windows: list[int | None]):
        layers: list[KVLayer] = [
            SlidingWindowLayer(w, i) if w else method.make_layer(i) for i, w in enumerate(windows)
        ]
        super().__init__(layers=layers)

    @contextlib.contextmanager
    def active(self):
        """Route kvbench's attention function to this cache while the model runs."""
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)

    def begin(self, prompt_tokens: int) -> None:
        """Tell every layer the prompt's length before its prefill (a chunked prefill's first step
        sees only the first chunk, and capacities follow the whole prompt)."""
        for layer in self.layers:
            layer.prompt_tokens = prompt_tokens

    def end_step(self, phase: Phase) -> None:
        for layer in self.layers:
            layer.end_step(phase)

    # -- measurements -----------------------------------------------------------------------------
    def bytes_held(self) -> int:
        return sum(layer.bytes_held() for layer in self.layers)

    def bytes_full(self) -> int:
        return sum(layer.bytes_full() for layer in self.layers)

    def bytes_read(self) -> int:
        """Bytes the last forward step read from the cache, every layer together."""
        return sum(layer.bytes_read() for layer in self.layers)

    def tokens_per_layer(self) -> list[float]:
        """Mean tokens held per KV head, for every layer."""
        return [layer.tokens_held().float().mean().item() for layer in self.layers]

    def stats(self) -> dict:
        """What the cache holds now, as recorded in results."""
        per_layer = self.tokens_per_layer()
        compressible = [t for t, layer in zip(per_layer, self.layers) if not layer.is_sliding]
        held, full = self.bytes_held(), self.bytes_full()
        return {
            "tokens_held": sum(compressible) / max(1, len(compressible)),
            "tokens_per_layer": [round(t, 2) for t in per_layer],
            "bytes_held": held,
            "bytes_full": full,
            "ratio": full / held if held else float("inf"),
        }


def _causal_mask(q_len: int, kv_len: int, window: int | None, device) -> torch.Tensor | None:
    """Bottom-right aligned causal mask (True = attend); None when every key is visible.

    The queries are the last ``q_len`` tokens of the ``kv_len`` the layer returned. For windowed
    layers the cache is contiguous, so physical distance is positional distance.
    """
    if q_len == 1 and (window is None or kv_len <= window):
        return None
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= (q - k) < window
    return mask


def ragged_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, segments: torch.Tensor,
                     positions: torch.Tensor, kv_heads: int, query_start: int, scaling: float) -> torch.Tensor:
    """Exact attention over a cache in the flat layout, each KV head over its own tokens only.

    ``query`` (batch, q_heads, q, d) sits at positions ``query_start ..``; ``keys``/``values``
    (1, 1, T, d) hold the tokens of every (batch, KV head) segment, ``segments``/``positions``
    (1, 1, T) say whose each token is (``batch * kv_heads + head``) and where it sits, and every
    segment holds at least the step's own tokens. The queries are the rows of one SDPA call over
    the T tokens, masked so that a row sees its own segment, causally by position: every held byte
    is read once, as dense attention reads it. Returns (batch, q_heads, q, d)."""
    b, hq, q, d = query.shape
    # rows in (batch, KV head, its group's q heads, query) order: segment = row // (rows per segment)
    row_segment = torch.arange(b * hq * q, device=query.device) // (hq // kv_heads * q)
    mask = row_segment[:, None] == segments[0, 0][None, :]
    if q > 1:  # a decoding step's one query comes after every held token
        row_position = query_start + torch.arange(q, device=query.device).repeat(b * hq)
        mask &= positions[0, 0][None, :] <= row_position[:, None]
    out = F.scaled_dot_product_attention(query.reshape(1, 1, b * hq * q, d), keys, values,
                                         attn_mask=mask, scale=scaling)
    return out.view(b, hq, q, -1)


def layer_attention(layer: KVLayer, query, keys, values, scaling, window=None) -> torch.Tensor | None:
    """A layer's part of one attention call: it sees the step's queries (``observe``), then may
    compute the output itself (``attend``, (batch, q_heads, q, d)); None leaves it to SDPA."""
    layer.observe(query, keys, scaling)
    return layer.attend(query, keys, values, scaling, window)


def kvbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, **kwargs):
    """Attention function registered as ``attn_implementation="kvbench"``.

    Arguments and return value follow transformers' attention interface: query (b, hq, q, d),
    key/value (b, hkv, k, d) as returned by the cache; returns ((b, q, hq, d), None).
    ``attention_mask`` is ignored: transformers builds none for custom implementations, and kvbench
    does not pad (a batch holds prompts of equal length).
    """
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("kvbench attention does not implement logit soft-capping")
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    cache = _active.get()
    layer = cache.layers[module.layer_idx] if cache is not None else None
    if layer is not None:
        out = layer_attention(layer, query, key, value, scaling, window)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = None if (q_len == kv_len and window is None) else _causal_mask(q_len, kv_len, window, query.device)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=(mask is None and q_len > 1), scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, kvbench_attention)
