"""MiKV (Yang et al. 2024, "No Token Left Behind", arXiv 2402.18096): mixed precision instead of eviction.

No official code; this follows the methods reference (``shared/reference/methods.md``):

- Importance: H2O-style accumulated attention - every query of every step adds its attention
  probabilities, summed over the query heads of a GQA group (``scores.attention_with_received``
  gives the group mean; times the group size is the sum, so the ranking is H2O's).
- Important set: ``C`` tokens per layer and KV head, half the most recent (``recent_fraction``), half
  the top-scoring others, stored in high precision (fp16 by default; int8 / int4 options). Every other
  token is kept in low precision (int2 default; int3 / int4) instead of being dropped.
- Quantisation (``packing.quantize``, shared with the ``quant`` baseline, held in
  ``storage.PackedStore``): per token, asymmetric round-to-nearest in groups of ``g`` channels
  (``g = head_dim / 2`` by default), fp16 scale and zero, codes packed into uint8 (``packing.pack``):
  int2 / int4 / int8 as 4 / 2 / 1 codes per byte, int3 densely (8 codes in 3 bytes, no padding bits),
  so ``bytes_held`` is the real storage.
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
  checked by ``setup`` once the model is loaded. E.g. fp16 / int2: at most 4x for head_dim 32,
  5.33x for 64, 6.4x for 128 - never 8x.
- A budget (either mode) is ``C`` itself: a fixed number of high-precision tokens per layer and head,
  all later tokens going to low precision as they age out of it.

Bytes: high-precision "fp16" tokens really are fp16 whatever the model dtype, so the nominal ratio is
against a 16-bit cache while the measured one is against what the full cache holds in the model's
dtype - twice as high on a float32 model. For the same reason even an all-important cache (ratio 1,
or a budget above the sequence) equals the full cache only when the model runs in fp16
(``tests/methods/test_mikv.py`` checks exactly that on an fp16 copy of the tiny model). A bf16 model's keys and
values lose nothing in fp16 unless they exceed fp16's range (65504) or fall below its normal range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.errors import ConfigError
from kvbench.methods import register
from kvbench.methods.base import KVLayer, Method, Phase, head_dim
from kvbench.params import param
from kvbench.methods.scores import attention_with_received
from kvbench.packing import codes_per_unit
from kvbench.storage import DenseStore, PackedStore, gather_tokens

HIGH_BITS = (16, 8, 4)  # 16 = fp16 storage
LOW_BITS = (2, 3, 4)
RATIO_MODES = ("tokens", "memory")


@dataclass
class MiKVParams:
    #: how a ratio sets the important set: "tokens" (C = round(n / ratio)) or "memory" (16-bit memory
    #: ratio, solved for the important fraction); a budget is C in both
    ratio_mode: str = param("tokens", choices=RATIO_MODES)
    #: bits of the important tokens: 16 = fp16, 8 / 4 = int8 / int4 (grouped like the low ones)
    high_bits: int = param(16, choices=HIGH_BITS)
    #: bits of all other tokens (int3 packed densely: 8 codes in 3 bytes)
    low_bits: int = param(2, choices=LOW_BITS)
    #: channels per quantisation group (fp16 scale and zero each); null = head_dim / 2
    group_size: int | None = param(None, ge=1)
    #: share of the important set given to the most recent tokens (the rest: top accumulated attention)
    recent_fraction: float = param(0.5, ge=0, le=1)
    #: key outlier balancer (store quantised k * b, attend as with q / b)
    balancer: bool = param(True)


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


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-1)


class MiKVLayer(KVLayer):
    """Two groups of stores per layer: the important tokens (``hi_k``/``hi_v``: fp16 or packed) and
    the others (``lo_k``/``lo_v``: packed), each with its own positions; the step's new tokens wait
    in float in ``keys``/``values`` until ``end_step`` (use, then compress: the step that adds them
    attends over their exact values). ``update`` hands attention the important tokens, then the
    others, then the new ones, and ``positions`` follows that order: attention does not depend on the
    order of held keys (they carry RoPE), so nothing is re-sorted by position. Packed key stores
    hold ``k * balance`` (``PackedStore.channel_scale``).
    """

    key_stores = ("hi_k", "lo_k", "keys")
    value_stores = ("hi_v", "lo_v", "values")
    state_fields = KVLayer.state_fields + (
        "new_scores", "balance", "hi_positions", "hi_scores", "lo_positions", "group")

    def __init__(self, method: "MiKV", layer_idx: int):
        super().__init__(method, layer_idx)
        self.new_scores: torch.Tensor | None = None  # attention the pending tokens received in this step
        self.balance: torch.Tensor | None = None  # (b, h, d) fp32 key balancer, from the prompt
        self.hi_positions: torch.Tensor | None = None
        self.hi_scores: torch.Tensor | None = None  # accumulated attention of the important tokens
        self.lo_positions: torch.Tensor | None = None  # low-precision tokens: never promoted, no scores
        self.group = 0

    # the base stores (keys, values, positions) hold the step's new tokens until end_step; the
    # important and low-precision stores open at the first end_step, once the head size and the
    # balancer are known

    @property
    def new_positions(self) -> torch.Tensor | None:
        return self.stores["positions"].tensor

    @property
    def positions(self) -> torch.Tensor | None:
        parts = [p for p in (self.hi_positions, self.lo_positions, self.new_positions) if p is not None]
        return torch.cat(parts, dim=-1) if parts else None

    def _open_stores(self) -> None:
        params = self.method.params
        self.group = self.method.group_for(self.kv_shape[2])
        balance = self.balance  # None without the balancer
        for key, scale in (("k", balance), ("v", None)):
            self.stores[f"hi_{key}"] = (DenseStore(torch.float16) if params.high_bits == 16
                                        else PackedStore(params.high_bits, self.group, scale))
            self.stores[f"lo_{key}"] = PackedStore(params.low_bits, self.group, scale)

    # -- method hooks -------------------------------------------------------------------------------
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

    def compress(self, phase: Phase) -> None:
        if not self.stores["keys"].tokens:
            return
        params = self.method.params
        if "hi_k" not in self.stores:
            self._open_stores()
        new_scores = self.new_scores if self.new_scores is not None else torch.zeros(
            self.new_positions.shape, dtype=torch.float32, device=self.keys.device)
        # every new token enters the important set ...
        cand_pos = _cat(self.hi_positions, self.new_positions)
        cand_scores = _cat(self.hi_scores, new_scores)
        limit = self.method.important_tokens(self.seen, self.group)
        keep = None
        if cand_pos.shape[-1] > limit:
            # ... and the lowest-scoring non-recent ones go to low precision, demoted from float: the new
            # tokens' exact values, the old ones' high-precision codes
            recent = int(limit * params.recent_fraction)
            rank = cand_scores.masked_fill(cand_pos >= self.seen - recent, float("inf"))
            rank = rank.argsort(dim=-1, descending=True, stable=True)
            keep, drop = rank[..., :limit].sort(dim=-1).values, rank[..., limit:]
            for key in ("k", "v"):
                hi, new = self.stores[f"hi_{key}"], self.stores["keys" if key == "k" else "values"].tensor
                old = [hi.read(dtype=torch.float32)] if hi.tokens else []
                self.stores[f"lo_{key}"].append(gather_tokens(torch.cat([*old, new.float()], dim=2), drop))
            self.lo_positions = _cat(self.lo_positions, cand_pos.gather(-1, drop))
            cand_pos, cand_scores = cand_pos.gather(-1, keep), cand_scores.gather(-1, keep)
        for key, pending in (("k", "keys"), ("v", "values")):
            self.stores[f"hi_{key}"].append(self.stores[pending].tensor)
            if keep is not None:
                self.stores[f"hi_{key}"].keep(keep)
        for pending in ("keys", "values", "positions"):
            self.stores[pending].clear()
        self.hi_positions, self.hi_scores = cand_pos, cand_scores
        self.new_scores = None

    # -- what is held -------------------------------------------------------------------------------
    def important_held(self) -> torch.Tensor:
        """High-precision tokens per (batch, kv_head)."""
        b, h = self.kv_shape[:2]
        return torch.full((b, h), 0 if self.hi_positions is None else self.hi_positions.shape[-1], dtype=torch.long)

    def state_bytes(self) -> int:
        return 0 if self.balance is None else self.balance.numel() * self.balance.element_size()


@register
class MiKV(Method):
    """MiKV: important tokens in high precision, all others quantised, nothing evicted (see the module
    docstring for the importance score, the balancer and how a ratio or budget sets the important set)."""

    name = "mikv"
    Params = MiKVParams
    layer = MiKVLayer
    phases = ("prefill", "append", "decode")
    ratio_note = ("nothing is evicted: every token is held, important ones in fp16 (or int8/int4), the rest "
                  "quantised with fp16 scales and zeros. ratio_mode 'tokens' (default): the ratio sets the "
                  "important fraction (1 / ratio), so the memory ratio is far below nominal; ratio_mode "
                  "'memory': the nominal ratio is against a 16-bit cache, the measured one against the model's "
                  "real cache dtype (about twice as high on float32 models) and it counts the fp32 key balancer")
    lossy_note = ("all non-important tokens are quantised (int2 by default), and even important tokens are "
                  "stored in fp16: with everything important the cache is exact only for fp16 models "
                  "(tests/methods/test_mikv.py checks that case)")

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

    @classmethod
    def check_params(cls, params: MiKVParams) -> None:
        if params.low_bits >= params.high_bits:
            raise ConfigError(f"mikv.low_bits ({params.low_bits}) must be below high_bits ({params.high_bits})")

    def setup(self, model) -> None:
        super().setup(model)
        self.group_for(head_dim(model.config))

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

    def group_for(self, channels: int) -> int:
        """Channels per quantisation group for this head size; checks that the codes pack."""
        group = self.params.group_size or channels // 2
        if channels % group or group < 1:
            raise ConfigError(f"mikv: group_size {group} must divide head_dim {channels}")
        for bits in {self.params.low_bits, self.params.high_bits} - {16}:
            unit = codes_per_unit(bits)
            if channels % unit:
                raise ConfigError(f"mikv: int{bits} codes pack {unit} at a time; head_dim {channels} "
                                  f"is not a multiple of {unit}")
        if self.params.ratio_mode == "memory" and self.compression.ratio is not None:
            self.memory_rho(group)  # the exact range, now that the head size is known
        return group

    def important_tokens(self, n: int, group: int) -> int:
        """C: high-precision tokens per layer and head once the sequence has ``n`` tokens."""
        c = self.compression
        if c.budget is not None:
            return c.budget
        if self.params.ratio_mode == "tokens":
            return round(n / c.ratio)
        return round(self.memory_rho(group) * n)
