from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import ConfigError
from kvbench.methods import register
from kvbench.methods.base import KVLayer, Method, Phase, head_dim
from kvbench.params import param
from kvbench.packing import codes_per_unit
from kvbench.storage import PackedStore

#: bit widths the quant baseline offers (8 / bits values per byte) and their nominal ratio 16 / bits
BITS = (2, 4, 8)


@dataclass
class QuantParams:
    #: bits per element; null = chosen from the ratio as 16 / ratio (see Quant)
    bits: int | None = param(None, choices=BITS)
    #: channels sharing one scale and zero point within a token; null = the whole head_dim (one
    #: scale and zero per token and head)
    group_size: int | None = param(None, ge=1)


class QuantLayer(KVLayer):
    """Holds every token, packed (``packed_keys``, ``packed_values``). The step's new tokens wait in
    float in ``keys``/``values`` until ``end_step`` (use, then compress: the step that adds them
    attends over their exact values). ``positions`` covers every token, packed ones first."""

    key_stores = ("packed_keys", "keys")
    value_stores = ("packed_values", "values")

    def compress(self, phase: Phase) -> None:
        if "packed_keys" not in self.stores:
            # opened here, not in the prefill forward: a prefill state shared between ratios must not
            # carry one ratio's bit width
            group = self.method.group_for(self.kv_shape[2])
            for name in ("packed_keys", "packed_values"):
                self.stores[name] = PackedStore(self.method.bits, group)
        for pending, packed in (("keys", "packed_keys"), ("values", "packed_values")):
            if self.stores[pending].tokens:
                self.stores[packed].append(self.stores[pending].tensor)
                self.stores[pending].clear()


@register
class Quant(Method):
    """Uniform KV quantisation (KIVI-style round-to-nearest, Liu et al. 2024), no eviction.

    Every key and value is quantised per token, asymmetrically, in groups of ``group_size`` channels
    (default the whole head: one fp16 scale and zero per token and head), to ``bits`` bits, and
    stored packed (8 / bits values per uint8) with its fp16 scales and zeros, so ``bytes_held`` is
    the real storage. Attention runs on the dequantised values; a step's new tokens are quantised at
    its end (the step itself sees them exactly). The simple per-token baseline, not KIVI: keys are
    quantised per token like values, and no recent tokens stay in full precision; ``kivi`` is KIVI
    as its paper defines it (keys per channel in groups of tokens, a full-precision residual window).

    Ratio: quantisation compresses by its bit width, not by dropping tokens, so the ratio selects the
    bit width as ``bits = 16 / ratio`` - ratio 2, 4, 8 = int8, int4, int2 - the usual convention of
    counting against a 16-bit cache. Other ratios, a ratio that contradicts an explicit ``bits``,
    and a budget (:attr:`budget_refusal`: no capacity in tokens or bytes can hold a sequence that
    only grows) are configuration errors raised when the method is built; a head size that
    ``group_size`` or the packing does not divide is one raised by ``setup``, once the model is loaded.
    """

    name = "quant"
    Params = QuantParams
    layer = QuantLayer
    phases = ("prefill", "append", "decode")
    ratio_note = ("the ratio names the bit width (16 / bits, against a 16-bit cache); the measured ratio "
                  "is against the model's real cache dtype (about twice the nominal with an fp32 cache) "
                  "and counts the fp16 scale and zero of every group (which lower it)")
    lossy_note = "quantisation changes every key and value, even when nothing is evicted"
    budget_refusal = ("it keeps every token at a fixed bit width, so its bytes grow with the sequence and no "
                      "capacity can bound them without evicting, which is not this method")

    def __init__(self, params, compression, seed: int = 0):
        super().__init__(params, compression, seed)
        self.bits = self.bits_for(params, compression)

    @classmethod
    def bits_for(cls, params: QuantParams, compression) -> int:
        if compression is None or compression.budget is not None:
            raise ConfigError(f"{cls.name} takes no budget: {cls.budget_refusal}; give ratio = 16 / bits instead "
                              f"({', '.join(f'{16 // b} for int{b}' for b in BITS)})")
        achievable = {16 // b: b for b in BITS}
        if params.bits is not None and compression.ratio != 16 / params.bits:
            raise ConfigError(f"{cls.name} with bits={params.bits} compresses {16 / params.bits:g}x (16-bit / "
                              f"{params.bits}-bit); ratio {compression.ratio:g} is not achievable with it")
        if compression.ratio not in achievable:
            raise ConfigError(f"{cls.name} cannot reach ratio {compression.ratio:g}: its achievable ratios are "
                              f"{', '.join(f'{r} (int{b})' for r, b in achievable.items())}")
        return achievable[compression.ratio]

    def setup(self, model) -> None:
        super().setup(model)
        self.group_for(head_dim(model.config))

    def group_for(self, channels: int) -> int:
        """Channels per quantisation group for heads of ``channels``; checks that the codes pack."""
        group = self.channel_group(channels)
        if channels % group or channels % codes_per_unit(self.bits):
            raise ConfigError(f"{self.name}: head_dim {channels} must be a multiple of group_size {group} "
                              f"and of {codes_per_unit(self.bits)} (values per byte at {self.bits} bits)")
        return group

    def channel_group(self, channels: int) -> int:
        """``group_size``, or the whole head if it is null."""
        return self.params.group_size or channels
