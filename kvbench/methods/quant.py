from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbench.methods import register
from kvbench.methods.base import KVLayer, Method, Phase, append_along_tokens, gather_tokens
from kvbench.errors import ConfigError

#: bit widths the quant baseline offers (8 / bits values per byte) and their nominal ratio 16 / bits
BITS = (2, 4, 8)
_UP, _DOWN = float("inf"), float("-inf")


@dataclass
class QuantParams:
    #: bits per element: 2, 4 or 8; null = chosen from the ratio as 16 / ratio (see Quant)
    bits: int | None = None
    #: channels sharing one scale and zero point within a token; null = the whole head_dim (one
    #: scale and zero per token and head)
    group_size: int | None = None

    def validate(self):
        if self.bits is not None and self.bits not in BITS:
            raise ConfigError(f"quant.bits must be one of {BITS} (or null), got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"quant.group_size must be >= 1 (or null), got {self.group_size}")


@dataclass
class Packed:
    """Tokens quantised per token in groups of channels: ``data`` (batch, heads, n, d * bits / 8)
    uint8 packed by :func:`pack`; ``scale`` and ``zero`` (batch, heads, n, d / group) fp16."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    #: the storage behind data, scale and zero when they came from :meth:`append`
    buffers: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def tokens(self) -> int:
        return self.data.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))

    def append(self, other: "Packed") -> "Packed":
        """These tokens followed by ``other``'s, written into the spare room of this one's storage where
        it fits (``base.append_along_tokens``): appending a token does not copy the held ones."""
        buffers = self.buffers or (None, None, None)
        grown = [append_along_tokens(held, new, buffer) for held, new, buffer in
                 zip((self.data, self.scale, self.zero), (other.data, other.scale, other.zero), buffers)]
        return Packed(*(view for view, _ in grown), self.bits, tuple(buffer for _, buffer in grown))

    def gather(self, idx: torch.Tensor) -> "Packed":
        """The tokens at ``idx`` (batch, heads, k), in that order."""
        return Packed(gather_tokens(self.data, idx), gather_tokens(self.scale, idx), gather_tokens(self.zero, idx),
                      self.bits)


def quantize(x: torch.Tensor, bits: int, group: int) -> Packed:
    """Asymmetric round-to-nearest of ``x`` (..., d) in groups of ``group`` channels.

    ``scale = (max - min) / (2^bits - 1)``, ``zero = min``, both stored in fp16; they are rounded
    outwards (zero down, scale up) so the stored range still covers the group, which keeps the error
    of every element within ``scale / 2``."""
    levels = 2 ** bits - 1
    g = x.float().unflatten(-1, (-1, group))
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    zero = lo.half()
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, zero.new_tensor(_DOWN)), zero)
    scale = ((hi - zero.float()) / levels).half()
    short = zero.float() + scale.float() * levels < hi
    scale = torch.where(short, torch.nextafter(scale, scale.new_tensor(_UP)), scale)
    step = torch.where(scale == 0, 1.0, scale.float())[..., None]  # a constant group codes as all 0
    q = ((g - zero.float()[..., None]) / step).round().clamp(0, levels).to(torch.uint8).flatten(-2)
    return Packed(pack(q, bits), scale, zero, bits)


def dequantize(p: Packed, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``codes * scale + zero`` (batch, heads, n, d), computed in float32 and returned in ``dtype``
    (default float32), or written into ``out`` (any strides: the front of a longer tensor, say).

    Widths dividing 8 unpack one code slot of every byte at a time, straight into the result: a
    decoding step dequantises the whole cache, and this is 3-4x faster than :func:`unpack`'s
    broadcast over uint8."""
    d = p.data.shape[-1] * 8 // p.bits
    exact = out is not None and out.dtype == torch.float32
    work = out if exact else torch.empty((*p.data.shape[:3], d), dtype=torch.float32, device=p.data.device)
    if 8 % p.bits == 0:
        per_byte = 8 // p.bits
        slots = work.unflatten(-1, (-1, per_byte))
        for i in range(per_byte):
            codes = p.data >> (p.bits * i)
            slots[..., i] = codes & (2 ** p.bits - 1) if i < per_byte - 1 else codes
    else:
        work.copy_(unpack(p.data, p.bits))
    work.unflatten(-1, (p.scale.shape[-1], -1)).mul_(p.scale.float()[..., None]).add_(p.zero.float()[..., None])
    if out is None:
        return work if dtype in (None, torch.float32) else work.to(dtype)
    if not exact:
        out.copy_(work)
    return out


def followed_by(held: list, new: torch.Tensor, decode=dequantize) -> torch.Tensor:
    """One tensor of every held store, decoded in turn by ``decode(store, out=...)``, followed by
    ``new``: what a step attends over. Each part is written once into the result (no concatenation of
    copies)."""
    sizes = [store.tokens if isinstance(store, Packed) else store.shape[2] for store in held]
    out = new.new_empty((*new.shape[:2], sum(sizes) + new.shape[2], new.shape[-1]))
    at = 0
    for store, size in zip(held, sizes):
        decode(store, out=out[:, :, at:at + size])
        at += size
    out[:, :, at:] = new
    return out


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., d) in [0, 2^bits) -> (..., d * bits / 8) bytes, the first code in the low bits.

    Widths dividing 8 (1, 2, 4, 8) put 8 / bits codes in each byte (d a multiple of 8 / bits). Other
    widths (3, 5, 6, 7 - MiKV's int3) are packed densely, with no padding bits: every 8 codes form one
    little-endian ``8 * bits``-bit word stored as ``bits`` bytes (d a multiple of 8). Both layouts are
    the same bit stream - code i at bits ``[i * bits, (i + 1) * bits)`` - so the first is the special
    case of the second."""
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
        return (q.unflatten(-1, (-1, 8 // bits)) << shifts).sum(dim=-1, dtype=torch.uint8)
    code_shifts = torch.arange(0, 8 * bits, bits, device=q.device)  # at most 56 bits: fits an int64
    words = (q.unflatten(-1, (-1, 8)).long() << code_shifts).sum(dim=-1)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=q.device)
    return ((words[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device)
        return ((data[..., None] >> shifts) & (2 ** bits - 1)).flatten(-2)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=data.device)
    words = (data.unflatten(-1, (-1, bits)).long() << byte_shifts).sum(dim=-1)
    code_shifts = torch.arange(0, 8 * bits, bits, device=data.device)
    return ((words[..., None] >> code_shifts) & (2 ** bits - 1)).to(torch.uint8).flatten(-2)


class QuantLayer(KVLayer):
    """Holds every token, packed. The step's new tokens wait in float in ``keys``/``values`` until
    ``end_step`` (use, then compress: the step that adds them attends over their exact values).
    ``positions`` covers every token, packed ones first."""

    state_fields = KVLayer.state_fields + ("packed", "dtype", "head_dim")

    def __init__(self, method: "Quant", layer_idx: int):
        super().__init__(method, layer_idx)
        self.packed: tuple[Packed, Packed] | None = None  # quantised keys and values
        self.dtype: torch.dtype | None = None
        self.head_dim = 0

    @property
    def is_initialized(self) -> bool:
        return self.packed is not None or self.keys is not None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.packed is None:
            self.append(key_states, value_states)
            self.dtype, self.head_dim = key_states.dtype, key_states.shape[-1]
            return self.keys, self.values
        b, h, q, _ = key_states.shape
        self.append_tokens("positions", torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q))
        self.seen += q
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:  # two forwards before an end_step: both wait
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
        return followed_by([self.packed[0]], self.keys), followed_by([self.packed[1]], self.values)

    def end_step(self, phase: Phase) -> None:
        if self.keys is None:
            return
        bits, group = self.method.bits, self.method.params.group_size or self.head_dim
        if self.head_dim % group or self.head_dim % (8 // bits):
            raise ConfigError(f"quant: head_dim {self.head_dim} must be a multiple of group_size {group} "
                              f"and of {8 // bits} (values per byte at {bits} bits)")
        new = tuple(quantize(x, bits, group) for x in (self.keys, self.values))
        self.packed = new if self.packed is None else tuple(p.append(q) for p, q in zip(self.packed, new))
        self.keys = self.values = None

    def get_seq_length(self) -> int:
        return self.seen

    def tokens_held(self) -> torch.Tensor:
        return torch.full(self.positions.shape[:2], self.seen, dtype=torch.long)

    def bytes_held(self) -> int:
        pending = 0 if self.keys is None else super().bytes_held()
        return pending + (0 if self.packed is None else sum(p.nbytes() for p in self.packed))

    def bytes_full(self) -> int:
        b, h = self.positions.shape[:2]
        return 2 * b * h * self.seen * self.head_dim * self.dtype.itemsize


@register
class Quant(Method):
    """Uniform KV quantisation (KIVI-style round-to-nearest, Liu et al. 2024), no eviction.

    Every key and value is quantised per token, asymmetrically, in groups of ``group_size`` channels
    (default the whole head: one fp16 scale and zero per token and head), to ``bits`` bits, and
    stored packed (8 / bits values per uint8) with its fp16 scales and zeros, so ``bytes_held`` is
    the real storage. Attention runs on the dequantised values; a step's new tokens are quantised at
    its end (the step itself sees them exactly). Simplifications w.r.t. KIVI: keys are quantised per
    token like values (KIVI quantises keys per channel), and there is no full-precision residual
    window of recent tokens.

    Ratio: quantisation compresses by its bit width, not by dropping tokens, so the ratio selects the
    bit width as ``bits = 16 / ratio`` - ratio 2, 4, 8 = int8, int4, int2 - the usual convention of
    counting against a 16-bit cache. Other ratios, a ratio that contradicts an explicit ``bits``,
    and a token budget are configuration errors raised when the method is built.
    """

    name = "quant"
    Params = QuantParams
    phases = ("prefill", "append", "decode")
    shares_prefill = True  # the prefill forward attends over exact values; the bit width acts in end_step
    ratio_note = ("the ratio names the bit width (16 / bits, against a 16-bit cache); the measured ratio "
                  "is against the model's real cache dtype (about twice the nominal with an fp32 cache) "
                  "and counts the fp16 scale and zero of every group (which lower it)")
    lossy_note = "quantisation changes every key and value, even when nothing is evicted"

    def __init__(self, params, compression, seed: int = 0):
        super().__init__(params, compression, seed)
        self.bits = self.bits_for(params, compression)

    @staticmethod
    def bits_for(params: QuantParams, compression) -> int:
        if compression is None or compression.budget is not None:
            raise ConfigError("quant keeps every token, so a token budget means nothing to it: give "
                              f"ratio = 16 / bits instead ({', '.join(f'{16 // b} for int{b}' for b in BITS)})")
        achievable = {16 // b: b for b in BITS}
        if params.bits is not None and compression.ratio != 16 / params.bits:
            raise ConfigError(f"quant with bits={params.bits} compresses {16 / params.bits:g}x (16-bit / "
                              f"{params.bits}-bit); ratio {compression.ratio:g} is not achievable with it")
        if compression.ratio not in achievable:
            raise ConfigError(f"quant cannot reach ratio {compression.ratio:g}: its achievable ratios are "
                              f"{', '.join(f'{r} (int{b})' for r, b in achievable.items())}")
        return achievable[compression.ratio]

    def describe(self) -> dict:
        return {**super().describe(), "bits_in_use": self.bits}

    def make_layer(self, layer_idx: int) -> QuantLayer:
        return QuantLayer(self, layer_idx)
