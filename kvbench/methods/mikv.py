"""MiKV (Yang et al. 2024, "No Token Left Behind", arXiv 2402.18096): mixed precision instead of eviction.

No official code; this follows the methods reference (``shared/reference/methods.md``):

- Importance: H2O-style accumulated attention - every query of every step adds its attention
  probabilities, summed over the query heads of a GQA group (``scores.attention_with_received``
  gives the group mean; times the group size is the sum, so the ranking is H2O's).
- Important set: ``C`` tokens per layer and KV head, half the most recent (``recent_fraction``), half
  the top-scoring others, stored in high precision (fp16 by default; int8 / int4 options). Every other
  token is kept in low precision (int2 default; int3 / int4) instead of being dropped.
- Quantisation (``quant.quantize``, shared with the ``quant`` baseline): per token, asymmetric
  round-to-nearest in groups of ``g`` channels (``g = head_dim / 2`` by default), fp16 scale and zero,
  codes packed into uint8 (``quant.pack``): int2 / int4 / int8 as 4 / 2 / 1 codes per byte, int3 densely
  (8 codes in 3 bytes, no padding bits), so ``bytes_held`` is the real storage.
- Key outlier balancer: per batch row, KV head and channel ``b_c = sqrt(max_t |q_t,c| / max_t |k_t,c|)``
  over the prompt (queries: all the group's query heads), fixed after the prefill. Quantised keys are
  stored as ``Q(k * b)``; ``update`` hands attention ``dequant / b`` - the same logits as attending
  with ``q / b`` over the stored ``k * b`` (``(q / b) . (k b) = q . k``), but exact SDPA, the mask and
  the attention scores all work unchanged. Keys stored in fp16 need no balancer and are stored as
  they are; values never get one. ``b`` is kept in fp32 and counted in ``bytes_held`` (``d`` floats
  per layer, head and batch row: negligible). ``balancer: false`` turns it off.
- Decoding (and an appended question): every new token enters the important set; while it holds more
  than ``C`` tokens the lowest-scoring important token outside the recent ``recent_fraction * C``
  positions is demoted to low precision. Tokens are never promoted back. A token demoted from int8 /
  int4 is re-quantised from its high-precision codes (its exact values are gone); new tokens are
  quantised from their exact values.

How ``C`` follows from the compression setting (``ratio_mode``):

- ``tokens`` (default): the ratio is an eviction ratio, ``C = round(n / ratio)`` - the important tokens
  are exactly what an eviction method keeps at that ratio, and the ones it would drop are kept in low
  precision (the paper's own comparison: "cache budget" = important fraction ``rho = 1 / ratio``; its
  default ``rho = 0.2`` is ratio 5). ``n`` grows during decoding, so the important set stays at
  ``rho * n``. Every ratio >= 1 works; the memory ratio is then much lower than the nominal one.
- ``memory``: the ratio is a memory ratio against a 16-bit cache, ``16 / bits`` with
  ``bits = rho * b_hi + (1 - rho) * (b_lo + 32 / g)`` per element (``b_hi = 16`` for fp16, ``b_hi + 32 / g``
  for int8 / int4, whose fp16 scale and zero cost the same; the methods reference's "23.1% with int8"
  example counts it too), solved for ``rho``; ``C = round(rho * n)``. A ratio outside
  ``[16 / b_hi, 16 / (b_lo + 32 / g)]`` is a ConfigError naming that range: raised when the method is
  built if ``group_size`` is set, else (``g`` depends on the model's ``head_dim``) ratios at or above
  ``16 / b_lo`` (unreachable for every ``g``) are rejected when it is built and the exact range is
  checked when the first prompt reaches the cache. E.g. fp16 / int2: at most 4x for head_dim 32,
  5.33x for 64, 6.4x for 128 - never 8x.
- A budget (either mode) is ``C`` itself: a fixed number of high-precision tokens per layer and head,
  all later tokens going to low precision as they age out of it.

Bytes: high-precision "fp16" tokens really are fp16 whatever the model dtype, so the nominal ratio is
against a 16-bit cache while the measured one is against what the full cache holds in the model's
dtype - twice as high on a float32 model. For the same reason even an all-important cache (ratio 1,
or a budget above the sequence) equals the full cache only when the model runs in fp16
(``tests/test_mikv.py`` checks exactly that on an fp16 copy of the tiny model). A bf16 model's keys and
values lose nothing in fp16 unless they exceed fp16's range (65504) or fall below its normal range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.methods import register
from kvbench.methods.base import KVLayer, Method, Phase, gather_tokens
from kvbench.errors import ConfigError
from kvbench.methods.quant import Packed, dequantize, followed_by, quantize
from kvbench.methods.scores import attention_with_received

HIGH_BITS = (16, 8, 4)  # 16 = fp16 storage
LOW_BITS = (2, 3, 4)
RATIO_MODES = ("tokens", "memory")

Store = torch.Tensor | Packed  # fp16 tokens, or packed integer tokens


@dataclass
class MiKVParams:
    #: how a ratio sets the important set: "tokens" (C = round(n / ratio)) or "memory" (16-bit memory
    #: ratio, solved for the important fraction); a budget is C in both
    ratio_mode: str = "tokens"
    #: bits of the important tokens: 16 = fp16, 8 / 4 = int8 / int4 (grouped like the low ones)
    high_bits: int = 16
    #: bits of all other tokens: 2, 3 or 4
    low_bits: int = 2
    #: channels per quantisation group (fp16 scale and zero each); null = head_dim / 2
    group_size: int | None = None
    #: share of the important set given to the most recent tokens (the rest: top accumulated attention)
    recent_fraction: float = 0.5
    #: key outlier balancer (store quantised k * b, attend as with q / b)
    balancer: bool = True

    def validate(self):
        if self.ratio_mode not in RATIO_MODES:
            raise ConfigError(f"mikv.ratio_mode must be one of {RATIO_MODES}, got {self.ratio_mode!r}")
        if self.high_bits not in HIGH_BITS:
            raise ConfigError(f"mikv.high_bits must be one of {HIGH_BITS} (16 = fp16), got {self.high_bits}")
        if self.low_bits not in LOW_BITS:
            raise ConfigError(f"mikv.low_bits must be one of {LOW_BITS}, got {self.low_bits}")
        if self.low_bits >= self.high_bits:
            raise ConfigError(f"mikv.low_bits ({self.low_bits}) must be below high_bits ({self.high_bits})")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"mikv.group_size must be >= 1 (or null for head_dim / 2), got {self.group_size}")
        if not 0 <= self.recent_fraction <= 1:
            raise ConfigError(f"mikv.recent_fraction must be in [0, 1], got {self.recent_fraction}")


def key_balancer(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``b = sqrt(max_t |q| / max_t |k|)`` per (batch, kv_head, channel), fp32; the maxima of the queries
    run over the tokens and the query heads of each group. A channel that is all zero in the queries
    or the keys gets ``b = 1`` (any b is exact there, and 0 or inf would not be)."""
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    q_max = query.abs().amax(dim=2).float().reshape(b, hkv, hq // hkv, d).amax(dim=2)
    k_max = keys.abs().amax(dim=2).float()
    usable = (q_max > 0) & (k_max > 0)
    return torch.where(usable, (q_max / k_max.clamp_min(torch.finfo(torch.float32).tiny)).sqrt(), 1.0)


def _cat(a: Store | None, b: Store) -> Store:
    if a is None:
        return b
    return a.append(b) if isinstance(a, Packed) else torch.cat([a, b], dim=2)


def _take(store: Store, idx: torch.Tensor) -> Store:
    return store.gather(idx) if isinstance(store, Packed) else gather_tokens(store, idx)


def _nbytes(store: Store | None) -> int:
    if store is None:
        return 0
    return store.nbytes() if isinstance(store, Packed) else store.numel() * store.element_size()


class MiKVLayer(KVLayer):
    """Two stores per layer: the important tokens (``hi_*``, fp16 or packed) and the others (``lo_*``,
    packed), each with its own positions; the step's new tokens wait in float in ``keys``/``values``
    until ``end_step`` (use, then compress: the step that adds them attends over their exact values).
    ``update`` hands attention the important tokens, then the others, then the new ones, and
    ``positions`` follows that order: attention does not depend on the order of held keys (they carry
    RoPE), so nothing is re-sorted by position.
    """

    state_fields = KVLayer.state_fields + (
        "new_positions", "new_scores", "balance", "hi_k", "hi_v", "hi_positions", "hi_scores",
        "lo_k", "lo_v", "lo_positions", "dtype", "head_dim", "group",
    )

    def __init__(self, method: "MiKV", layer_idx: int):
        super().__init__(method, layer_idx)
        self.new_positions: torch.Tensor | None = None  # positions of the pending keys/values
        self.new_scores: torch.Tensor | None = None  # their attention received in this step
        self.balance: torch.Tensor | None = None  # (b, h, d) fp32 key balancer, from the prompt
        self.hi_k = self.hi_v = None  # important tokens (Store)
        self.hi_positions: torch.Tensor | None = None
        self.hi_scores: torch.Tensor | None = None  # accumulated attention of the important tokens
        self.lo_k = self.lo_v = None  # low-precision tokens (Packed); never promoted, so no scores
        self.lo_positions: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self.head_dim = 0
        self.group = 0

    @property
    def is_initialized(self) -> bool:
        return self.positions is not None

    # -- storage ------------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, bits: int, key: bool) -> Store:
        if bits == 16:
            return x.to(torch.float16)
        x = x.float()
        if key and self.balance is not None:
            x = x * self.balance[:, :, None, :]
        return quantize(x, bits, self.group)

    def _decode(self, store: Store, key: bool, dtype: torch.dtype | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """The store's tokens un-balanced, in ``dtype`` or written into ``out``; integer codes are
        dequantised and un-balanced in float32 before any rounding to the model's dtype."""
        if not isinstance(store, Packed):
            return store.to(dtype) if out is None else out.copy_(store)
        balanced = key and self.balance is not None
        if out is not None and out.dtype == torch.float32:
            dequantize(store, out=out)
            return out.div_(self.balance[:, :, None, :]) if balanced else out
        x = dequantize(store)
        if balanced:
            x = x.div_(self.balance[:, :, None, :])
        return x.to(dtype) if out is None else out.copy_(x)

    def _stores(self, key: bool) -> list[Store]:
        return [s for s in ((self.hi_k, self.lo_k) if key else (self.hi_v, self.lo_v)) if s is not None]

    def _held_positions(self) -> torch.Tensor:
        return torch.cat([p for p in (self.hi_positions, self.lo_positions) if p is not None], dim=-1)

    # -- cache protocol -----------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        b, h, q, d = key_states.shape
        self.dtype, self.head_dim = key_states.dtype, d
        pos = torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q)
        if self.keys is None:
            self.keys, self.values, self.new_positions = key_states, value_states, pos
        else:  # two forwards before an end_step: both wait
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
            self.new_positions = torch.cat([self.new_positions, pos], dim=-1)
        self.seen += q
        if self.hi_positions is None:
            self.positions = self.new_positions
            return self.keys, self.values
        self.positions = torch.cat([self._held_positions(), self.new_positions], dim=-1)
        return tuple(followed_by(self._stores(key), new, lambda store, out, key=key: self._decode(store, key, out=out))
                     for key, new in ((True, self.keys), (False, self.values)))

    def get_seq_length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def attend(self, query, keys, values, scaling, sliding_window):
        if self.hi_positions is None and self.balance is None and self.method.params.balancer:
            self.balance = key_balancer(query, keys)  # the prefill: the prompt's queries and keys
        group = query.shape[1] // keys.shape[1]
        out, step = attention_with_received(query, keys, values, scaling)
        step = step * group  # sum over the group
        held = keys.shape[2] - self.keys.shape[2]
        if held:  # the important tokens come first (scores only matter for them)
            self.hi_scores = self.hi_scores + step[..., : self.hi_positions.shape[-1]]
        new = step[..., held:]
        # two forwards before one end_step (not kvbench's generation, but the protocol allows it): add up
        self.new_scores = new if self.new_scores is None else new + F.pad(
            self.new_scores, (0, new.shape[-1] - self.new_scores.shape[-1]))
        return out

    def end_step(self, phase: Phase) -> None:
        if self.keys is None:
            return
        params = self.method.params
        if self.hi_positions is None:
            self.group = self.method.group_for(self.head_dim)
        new_scores = self.new_scores if self.new_scores is not None else torch.zeros(
            self.new_positions.shape, dtype=torch.float32, device=self.keys.device)
        # every new token enters the important set ...
        cand_k = _cat(self.hi_k, self._encode(self.keys, params.high_bits, key=True))
        cand_v = _cat(self.hi_v, self._encode(self.values, params.high_bits, key=False))
        cand_pos = _cat(self.hi_positions, self.new_positions)
        cand_scores = _cat(self.hi_scores, new_scores)
        limit = self.method.important_tokens(self.seen, self.group)
        if cand_pos.shape[-1] > limit:
            # ... and the lowest-scoring non-recent ones go to low precision, demoted from float: the new
            # tokens' exact values, the old ones' high-precision codes
            recent = int(limit * params.recent_fraction)
            rank = cand_scores.masked_fill(cand_pos >= self.seen - recent, float("inf"))
            rank = rank.argsort(dim=-1, descending=True, stable=True)
            keep, drop = rank[..., :limit].sort(dim=-1).values, rank[..., limit:]
            for key, cand in ((True, cand_k), (False, cand_v)):
                old = [] if self.hi_k is None else [self._decode(self.hi_k if key else self.hi_v, key, torch.float32)]
                exact = torch.cat([*old, (self.keys if key else self.values).float()], dim=2)
                demoted = self._encode(gather_tokens(exact, drop), params.low_bits, key)
                if key:
                    self.lo_k = _cat(self.lo_k, demoted)
                else:
                    self.lo_v = _cat(self.lo_v, demoted)
            self.lo_positions = _cat(self.lo_positions, cand_pos.gather(-1, drop))
            cand_k, cand_v = _take(cand_k, keep), _take(cand_v, keep)
            cand_pos, cand_scores = cand_pos.gather(-1, keep), cand_scores.gather(-1, keep)
        self.hi_k, self.hi_v, self.hi_positions, self.hi_scores = cand_k, cand_v, cand_pos, cand_scores
        self.keys = self.values = self.new_positions = self.new_scores = None
        self.positions = self._held_positions()

    # -- what is held -------------------------------------------------------------------------------
    def tokens_held(self) -> torch.Tensor:
        return torch.full(self.positions.shape[:2], self.seen, dtype=torch.long)

    def important_held(self) -> torch.Tensor:
        """High-precision tokens per (batch, kv_head)."""
        b, h = self.positions.shape[:2]
        return torch.full((b, h), 0 if self.hi_positions is None else self.hi_positions.shape[-1], dtype=torch.long)

    def bytes_held(self) -> int:
        total = sum(_nbytes(s) for s in (self.hi_k, self.hi_v, self.lo_k, self.lo_v))
        if self.keys is not None:
            total += sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        if self.balance is not None:
            total += self.balance.numel() * self.balance.element_size()
        return total

    def bytes_full(self) -> int:
        b, h = self.positions.shape[:2]
        return 2 * b * h * self.seen * self.head_dim * self.dtype.itemsize


@register
class MiKV(Method):
    """MiKV: important tokens in high precision, all others quantised, nothing evicted (see the module
    docstring for the importance score, the balancer and how a ratio or budget sets the important set)."""

    name = "mikv"
    Params = MiKVParams
    phases = ("prefill", "append", "decode")
    needs_queries = True
    shares_prefill = True  # the prefill forward is exact; scores and balancer do not depend on the ratio
    ratio_note = ("nothing is evicted: every token is held, important ones in fp16 (or int8/int4), the rest "
                  "quantised with fp16 scales and zeros. ratio_mode 'tokens' (default): the ratio sets the "
                  "important fraction (1 / ratio), so the memory ratio is far below nominal; ratio_mode "
                  "'memory': the nominal ratio is against a 16-bit cache, the measured one against the model's "
                  "real cache dtype (about twice as high on float32 models) and it counts the fp32 key balancer")
    lossy_note = ("all non-important tokens are quantised (int2 by default), and even important tokens are "
                  "stored in fp16: with everything important the cache is exact only for fp16 models "
                  "(tests/test_mikv.py checks that case)")

    def __init__(self, params: MiKVParams, compression, seed: int = 0):
        super().__init__(params, compression, seed)
        if compression is None:
            raise ConfigError("mikv needs a ratio or a budget")
        if params.ratio_mode == "memory" and compression.ratio is not None:
            if params.group_size is not None:
                self.memory_rho(params.group_size)  # fail now on an unreachable ratio
            elif compression.ratio >= 16 / params.low_bits:
                raise ConfigError(
                    f"mikv cannot reach memory ratio {compression.ratio:g} with int{params.low_bits} low precision: "
                    f"even with no important token and no scale overhead it is below {16 / params.low_bits:g} "
                    f"(16 / {params.low_bits} bits)")

    @staticmethod
    def bits_per_element(bits: int, group: int) -> float:
        """Storage bits per element relative to nothing: fp16 = 16, integers + fp16 scale and zero per group."""
        return 16.0 if bits == 16 else bits + 32 / group

    def memory_rho(self, group: int) -> float:
        """Important fraction giving the memory ratio (against 16-bit), for groups of ``group`` channels."""
        p, ratio = self.params, self.compression.ratio
        hi, lo = self.bits_per_element(p.high_bits, group), self.bits_per_element(p.low_bits, group)
        precision = "fp16" if p.high_bits == 16 else f"int{p.high_bits}"
        if hi <= lo:
            raise ConfigError(f"mikv: with groups of {group} channels int{p.low_bits} costs {lo:g} bits per element, "
                              f"not less than {precision}'s {hi:g}; use a larger group_size")
        rho = (16 / ratio - lo) / (hi - lo)
        if not -1e-9 <= rho <= 1 + 1e-9:
            raise ConfigError(
                f"mikv cannot reach memory ratio {ratio:g} with {precision} important / int{p.low_bits} other tokens "
                f"and groups of {group} channels: achievable ratios are {16 / hi:.4g} (all important) to "
                f"{16 / lo:.4g} (none important)")
        return min(max(rho, 0.0), 1.0)

    def group_for(self, head_dim: int) -> int:
        """Channels per quantisation group for this head size; checks that the codes pack."""
        group = self.params.group_size or head_dim // 2
        if head_dim % group or group < 1:
            raise ConfigError(f"mikv: group_size {group} must divide head_dim {head_dim}")
        for bits in {self.params.low_bits, self.params.high_bits} - {16}:
            per_byte_unit = 8 // bits if 8 % bits == 0 else 8  # codes that fill whole bytes
            if head_dim % per_byte_unit:
                raise ConfigError(f"mikv: int{bits} codes pack {per_byte_unit} at a time; head_dim {head_dim} "
                                  f"is not a multiple of {per_byte_unit}")
        if self.params.ratio_mode == "memory" and self.compression.ratio is not None:
            self.memory_rho(group)  # the exact range, now that head_dim is known
        return group

    def important_tokens(self, n: int, group: int) -> int:
        """C: high-precision tokens per layer and head once the sequence has ``n`` tokens."""
        c = self.compression
        if c.budget is not None:
            return c.budget
        if self.params.ratio_mode == "tokens":
            return round(n / c.ratio)
        return round(self.memory_rho(group) * n)

    def make_layer(self, layer_idx: int) -> MiKVLayer:
        return MiKVLayer(self, layer_idx)
