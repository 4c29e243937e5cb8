"""Quantisation and bit-packing kernels shared by the quantising methods (``quant``, ``mikv``).

Pure functions on tensors (batch, heads, n, d): :func:`quantize` makes a :class:`Packed` (codes packed
into uint8 plus fp16 scale and zero per group of channels), :func:`dequantize` reads it back, and
:func:`pack` / :func:`unpack` are the bit layout. Storage with room to grow is
``kvbench.storage.PackedStore``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_UP, _DOWN = float("inf"), float("-inf")


@dataclass
class Packed:
    """Tokens quantised per token in groups of channels: ``data`` (batch, heads, n, d * bits / 8)
    uint8 packed by :func:`pack`; ``scale`` and ``zero`` (batch, heads, n, d / group) fp16."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    @property
    def tokens(self) -> int:
        return self.data.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))


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


def codes_per_unit(bits: int) -> int:
    """How many codes fill whole bytes: 8 / bits for widths dividing 8, else 8 (dense packing). The
    channel count must be a multiple of it."""
    return 8 // bits if 8 % bits == 0 else 8


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
