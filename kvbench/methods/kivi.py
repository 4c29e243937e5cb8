"""KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
arXiv 2402.02750; code jy-yuan/KIVI, ``models/llama_kivi.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import ConfigError
from kvbench.methods import register
from kvbench.methods.base import KVLayer, Phase
from kvbench.params import param
from kvbench.methods.quant import BITS, Quant
from kvbench.packing import codes_per_unit
from kvbench.storage import ChannelPackedStore, PackedStore


@dataclass
class KIVIParams:
    #: bits per element (KIVI-2 and KIVI-4 in the paper; 8 also packs); null = 16 / ratio
    bits: int | None = param(None, choices=BITS)
    #: G: tokens per key quantisation group (per channel) and channels per value group (per token)
    group_size: int = param(32, ge=1)
    #: R: the most recent tokens kept in full precision (a multiple of G)
    residual_length: int = param(128, ge=1)


class KIVILayer(KVLayer):
    """Quantised keys (``packed_keys``, per channel) and values (``packed_values``, per token) of the
    oldest tokens, then the full-precision residual (``keys``, ``values``, where each step's new
    tokens arrive). Keys and values are quantised at different times, but both quantised parts are
    the oldest tokens, so each list of stores reads back in position order, token for token."""

    key_stores = ("packed_keys", "keys")
    value_stores = ("packed_values", "values")

    def compress(self, phase: Phase) -> None:
        if "packed_keys" not in self.stores:
            # opened here, not in the prefill forward: a prefill shared between ratios must not carry
            # one ratio's bit width
            channels = self.kv_shape[2]
            self.stores["packed_keys"] = ChannelPackedStore(self.method.bits, self.method.params.group_size, channels)
            self.stores["packed_values"] = PackedStore(self.method.bits, self.method.group_for(channels))
        residual = self.method.params.residual_length
        keys, values = self.stores["keys"].tokens, self.stores["values"].tokens
        self.quantise_oldest("keys", "packed_keys", keys // residual * residual)
        self.quantise_oldest("values", "packed_values", max(0, values - residual))

    def quantise_oldest(self, full: str, packed: str, count: int) -> None:
        """Move the oldest ``count`` full-precision tokens of store ``full`` into store ``packed``."""
        if count:
            store = self.stores[full]
            self.stores[packed].append(store.tensor[:, :, :count])
            store.set(store.tensor[:, :, count:].clone())  # compact: the prompt-sized tensor is freed


@register
class KIVI(Quant):
    """KIVI: keys quantised per channel, values per token, the most recent tokens in full precision.

    - Keys are quantised per channel: every channel of a block of ``G = group_size`` consecutive
      tokens gets its own scale and zero (KIVI quantises ``K^T`` along its last axis, the tokens),
      because key outliers live in fixed channels. Values are quantised per token in groups of
      ``G`` channels (a head narrower than ``G`` is one group), because value errors mix per token.
      Both use asymmetric round-to-nearest to ``bits`` bits with an fp16 scale and zero per group
      (``packing.quantize``: the fp16 range is rounded outwards so every element stays within half
      a step, where KIVI rounds scale and zero to the nearest fp16). Codes are packed into bytes
      (``storage.ChannelPackedStore`` for keys, ``storage.PackedStore`` for values), so
      ``bytes_held`` is the real storage.
    - Residual: keys stay in full precision until ``R = residual_length`` of them have accumulated,
      then all ``R`` are quantised at once (``R / G`` blocks); values keep a sliding window of the
      last ``R`` tokens in full precision, the oldest one being quantised as each new token arrives.
      After a prompt of ``n`` tokens, as in KIVI's prefill: keys ``n - n mod R`` quantised and
      ``n mod R`` full; values ``max(0, n - R)`` quantised and the last ``min(n, R)`` full. The
      same rule runs after every step (prefill, an appended question, each decoded token).
    - Use, then compress: a step attends over its own tokens exactly; what it adds is quantised at
      its end, as in KIVI where the token that fills the residual is attended in full precision.
    - ``bits`` applies to keys and values alike (KIVI's ``k_bits = v_bits``, the paper's setting).
      Attention runs on the dequantised keys and values (KIVI fuses dequantisation into its
      kernels; the logits are the same up to float rounding).
    - The full-precision residual is held in the model's dtype, as in KIVI.

    How it differs from ``quant`` (the simple per-token baseline): ``quant`` quantises keys per
    token like values and keeps no full-precision tokens; KIVI's per-channel keys and residual
    window are what let it work at 2 bits.

    Ratio (``quant``'s rules, inherited with its head checks): the ratio names the bit width,
    ``bits = 16 / ratio``: 8 = KIVI-2 (the paper's default), 4 = KIVI-4, 2 = int8. Other ratios, a
    ratio contradicting an explicit ``bits`` and a token budget (KIVI keeps every token) are
    configuration errors.
    """

    name = "kivi"
    Params = KIVIParams
    layer = KIVILayer
    ratio_note = ("the ratio names the bit width (16 / bits, against a 16-bit cache); the measured ratio "
                  "counts the full-precision residual (up to residual_length tokens of keys and of values) "
                  "and the fp16 scale and zero of every group, and is against the model's real cache dtype")
    lossy_note = "quantisation changes every key and value outside the residual window"

    def __init__(self, params, compression, seed: int = 0):
        super().__init__(params, compression, seed)
        if params.group_size % codes_per_unit(self.bits):
            raise ConfigError(f"kivi: group_size {params.group_size} must be a multiple of "
                              f"{codes_per_unit(self.bits)} (codes per byte at {self.bits} bits)")

    @classmethod
    def check_params(cls, params: KIVIParams) -> None:
        if params.residual_length % params.group_size:
            raise ConfigError(f"kivi: residual_length {params.residual_length} must be a multiple of "
                              f"group_size {params.group_size} (keys are quantised R tokens at a time, "
                              "in blocks of G)")

    def channel_group(self, channels: int) -> int:
        """Values' group: ``group_size`` channels, the whole head if it is narrower."""
        return min(self.params.group_size, channels)
