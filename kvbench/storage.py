"""What a cache layer holds, as a type: a :class:`DenseStore` (a tensor) or a :class:`PackedStore`
(quantised codes with their scales and zeros), with one interface; a :class:`ChannelPackedStore`
quantises along tokens instead (KIVI's keys).

Every store holds tokens along dim 2 of (batch, heads, n, ...) tensors and offers ``append``, ``keep``,
``evict_one``, ``truncate``, ``clear``, ``nbytes``, ``read`` (into a tensor) and ``clone`` (for
snapshots). Layers own named stores (``KVLayer.stores``); what a layer holds, its bytes and its
snapshots are derived from them.

Stores grow in buffers with spare room: appending a decoded token writes into the room instead of
copying what is held (``torch.cat``), ``keep`` writes the kept tokens back into the same buffer, and
``evict_one`` moves the newest token into the freed slot. A store cut far below its buffer (a prompt
compressed to its capacity) gets a compact tensor, so the prompt-sized storage is freed.

Heads that hold different numbers of tokens (AdaKV's head-wise budgets) use the same stores in the
*flat* layout: every store holds (1, 1, T, ...), the T tokens of all (batch, head) segments together,
and a bookkeeping store names each token's segment ``batch * heads + head``. The bytes held are those
of the T tokens (the ragged size, no padding); ``flatten_heads``, ``segment_ids`` and
``pad_segments`` convert between the layouts.
"""

from __future__ import annotations

import torch

from kvbench.packing import Packed, dequantize, quantize


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens along dim 2 of ``x`` (batch, heads, n, ...) with ``idx`` (batch, heads, k)."""
    if x.dim() == 3:
        return torch.gather(x, 2, idx)
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def _growth(n: int) -> int:
    """Spare token slots allocated when a store of ``n`` tokens outgrows its buffer: an eighth
    (re-allocations stay O(log n) over a generation), at least 64."""
    return max(64, n // 8)


def _roomy(buffer: torch.Tensor, k: int) -> bool:
    """Whether ``k`` tokens may live in ``buffer`` without wasting more than twice the growth room."""
    return k <= buffer.shape[2] <= k + 2 * _growth(k)


def _is_prefix(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``view`` is ``buffer[:, :, :m]`` for some m (it was not re-assigned since)."""
    return (view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()
            and view.shape[:2] == buffer.shape[:2])


def append_along_tokens(held: torch.Tensor, new: torch.Tensor,
                        buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``held`` followed by ``new`` along the token axis (dim 2), and the buffer behind the result.

    ``new`` is written into the spare room of ``buffer`` when ``held`` is a prefix view of it and
    ``new`` fits, so appending a token does not copy what is held; otherwise both go into a new
    buffer with room to grow (:func:`_growth`). The room is allocated but untouched until tokens
    arrive (not resident on CPU)."""
    n, q = held.shape[2], new.shape[2]
    if buffer is None or not _is_prefix(held, buffer) or n + q > buffer.shape[2]:
        buffer = held.new_empty((*held.shape[:2], n + q + _growth(n + q), *held.shape[3:]))
        buffer[:, :, :n] = held
    buffer[:, :, n:n + q] = new
    return buffer[:, :, :n + q], buffer


def flatten_heads(x: torch.Tensor) -> torch.Tensor:
    """``x`` (batch, heads, n, ...) in the flat layout (1, 1, batch * heads * n, ...), segment-major."""
    return x.reshape(1, 1, -1, *x.shape[3:])


def segment_ids(batch: int, heads: int, n: int, device=None) -> torch.Tensor:
    """The segment (``batch_row * heads + head``) of every token of :func:`flatten_heads`'s result,
    (1, 1, batch * heads * n)."""
    return torch.arange(batch * heads, device=device).repeat_interleave(n)[None, None]


def segment_counts(segments: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Tokens held by each of ``n_segments`` segments, given the flat layout's ``segments`` (1, 1, T)."""
    return torch.bincount(segments.flatten(), minlength=n_segments)


def pad_segments(x: torch.Tensor, segments: torch.Tensor, batch: int, heads: int, fill) -> torch.Tensor:
    """The flat layout's ``x`` (1, 1, T, ...) as (batch, heads, m, ...), m the longest segment: each
    segment's tokens in their held order, then ``fill``. A copy to read, not a store."""
    seg = segments.flatten()
    counts = segment_counts(seg, batch * heads)
    order = seg.argsort(stable=True)  # grouped by segment, held order inside each
    starts = counts.cumsum(0) - counts
    rank = torch.arange(seg.numel(), device=seg.device) - starts[seg[order]]
    m = int(counts.max()) if seg.numel() else 0
    out = x.new_full((batch * heads, m, *x.shape[3:]), fill)
    out[seg[order], rank] = x[0, 0, order]
    return out.view(batch, heads, m, *x.shape[3:])


class DenseStore:
    """Tokens held as they are: ``tensor`` (batch, heads, n, ...), a prefix view of a buffer with
    spare room once a token has been appended.

    ``dtype``: the storage type new tokens are converted to (None: as given). ``bookkeeping``: the
    store holds what a method records about its tokens (positions, scores), not keys or values, and
    is not counted in the layer's KV bytes."""

    def __init__(self, dtype: torch.dtype | None = None, bookkeeping: bool = False):
        self.dtype, self.bookkeeping = dtype, bookkeeping
        self.tensor: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None

    @classmethod
    def holding(cls, tensor: torch.Tensor) -> "DenseStore":
        """A store whose content is ``tensor`` as it is (no copy): a view to read, such as one head's
        tokens repeated over a (batch, heads) shape."""
        store = cls()
        store.tensor = tensor
        return store

    @property
    def tokens(self) -> int:
        return 0 if self.tensor is None else self.tensor.shape[2]

    def to_flat_layout(self) -> None:
        """Hold the tokens in the flat layout (:func:`flatten_heads`); the next ``keep`` makes them compact."""
        if self.tensor is not None:
            self.tensor, self._buffer = flatten_heads(self.tensor), None

    def append(self, new: torch.Tensor) -> None:
        """Add ``new`` after the held tokens; the first tokens are held as given (no copy)."""
        if self.dtype is not None:
            new = new.to(self.dtype)
        if self.tensor is None:
            self.tensor = new
        else:
            self.tensor, self._buffer = append_along_tokens(self.tensor, new, self._buffer)

    def set(self, tensor: torch.Tensor) -> None:
        """Make ``tensor`` (a new tensor, not a view of the held one) the content."""
        buffer, k = self._buffer, tensor.shape[2]
        if buffer is not None and buffer.shape[:2] == tensor.shape[:2] and _roomy(buffer, k):
            buffer[:, :, :k] = tensor
            tensor = buffer[:, :, :k]
        else:
            self._buffer = None
        self.tensor = tensor

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the tokens at ``idx`` (batch, heads, k), in that order."""
        self.set(gather_tokens(self.tensor, idx))

    def truncate(self, k: int) -> None:
        """Keep the first ``k`` tokens."""
        held, buffer = self.tensor, self._buffer
        if buffer is not None and _is_prefix(held, buffer) and _roomy(buffer, k):
            self.tensor = buffer[:, :, :k]
        else:
            self._buffer = None
            self.tensor = held[:, :, :k].clone()

    def keep_last(self, k: int) -> None:
        """Keep the last ``k`` tokens (a view: the next append moves them into a new buffer)."""
        self.tensor = self.tensor[:, :, self.tokens - k:]

    def evict_one(self, slot: torch.Tensor) -> None:
        """Drop the token at index ``slot`` (batch, heads, 1) of every head: the last (newest) token
        moves into its place, so a decoding step moves one token instead of rewriting the store."""
        held, n = self.tensor, self.tokens
        index = slot if held.dim() == 3 else slot[..., None].expand(*slot.shape, held.shape[-1])
        newest = held[:, :, n - 1:].clone()  # may be the dropped token itself
        held.scatter_(2, index, newest)
        self.truncate(n - 1)

    def clear(self) -> None:
        self.tensor = self._buffer = None

    def nbytes(self) -> int:
        """Bytes of the tokens held (the buffer's spare room is not held)."""
        return 0 if self.tensor is None else self.tensor.numel() * self.tensor.element_size()

    def read(self, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tokens, in ``dtype`` (as stored if None) or written into ``out``."""
        if out is not None:
            return out.copy_(self.tensor)
        return self.tensor if dtype is None else self.tensor.to(dtype)

    def clone(self) -> "DenseStore":
        """An independent copy (a snapshot): later in-place updates of either do not reach the other."""
        copy = DenseStore(self.dtype, self.bookkeeping)
        copy.tensor = None if self.tensor is None else self.tensor.clone()
        return copy


class PackedStore:
    """Tokens quantised per token to ``bits`` bits in groups of ``group`` channels (``packing.quantize``):
    packed codes, fp16 scales and fp16 zeros, each a :class:`DenseStore` along the same token axis.

    ``channel_scale`` (batch, heads, d), if given, multiplies every token before it is quantised and
    divides it again, in float32, when it is read (MiKV's key balancer); it is the layer's state and
    not counted here."""

    bookkeeping = False

    def __init__(self, bits: int, group: int, channel_scale: torch.Tensor | None = None):
        self.bits, self.group, self.channel_scale = bits, group, channel_scale
        self.parts = (DenseStore(), DenseStore(), DenseStore())  # codes, scales, zeros

    @property
    def tokens(self) -> int:
        return self.parts[0].tokens

    def packed(self) -> Packed:
        """The held tokens as a :class:`packing.Packed` (views, no copy)."""
        return Packed(*(part.tensor for part in self.parts), self.bits)

    def append(self, x: torch.Tensor) -> None:
        """Quantise ``x`` (batch, heads, q, d) and add it after the held tokens."""
        if self.channel_scale is not None:
            x = x.float() * self.channel_scale[:, :, None, :]
        new = quantize(x, self.bits, self.group)
        for part, tensor in zip(self.parts, (new.data, new.scale, new.zero)):
            part.append(tensor)

    def keep(self, idx: torch.Tensor) -> None:
        for part in self.parts:
            part.keep(idx)

    def truncate(self, k: int) -> None:
        for part in self.parts:
            part.truncate(k)

    def evict_one(self, slot: torch.Tensor) -> None:
        for part in self.parts:
            part.evict_one(slot)

    def clear(self) -> None:
        for part in self.parts:
            part.clear()

    def nbytes(self) -> int:
        return sum(part.nbytes() for part in self.parts)

    def read(self, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantised tokens (``channel_scale`` undone in float32, before any rounding), in
        ``dtype`` (float32 if None) or written into ``out`` (any strides)."""
        packed = self.packed()
        if self.channel_scale is None:
            return dequantize(packed, dtype, out)
        scale = self.channel_scale[:, :, None, :]
        if out is not None and out.dtype == torch.float32:
            return dequantize(packed, out=out).div_(scale)
        x = dequantize(packed).div_(scale)
        return x.to(dtype) if out is None else out.copy_(x)

    def clone(self) -> "PackedStore":
        copy = PackedStore(self.bits, self.group, self.channel_scale)
        copy.parts = tuple(part.clone() for part in self.parts)
        return copy


class ChannelPackedStore:
    """Tokens quantised per channel in blocks of ``group`` consecutive tokens (KIVI's keys): each
    channel of a block gets ``group`` codes of ``bits`` bits and its own fp16 scale and zero.

    Held as a :class:`PackedStore` whose rows are the (block, channel) pairs, ``group`` codes each,
    so the per-token kernels pack them. Tokens arrive in whole blocks and are never evicted (KIVI
    only appends), so the store offers ``append``, ``read``, ``clear``, ``nbytes`` and ``clone``."""

    bookkeeping = False

    def __init__(self, bits: int, group: int, channels: int):
        self.group, self.channels = group, channels
        self.rows = PackedStore(bits, group)

    @property
    def tokens(self) -> int:
        return self.rows.tokens // self.channels * self.group

    def append(self, x: torch.Tensor) -> None:
        """Quantise ``x`` (batch, heads, q, channels), q a multiple of ``group``, and add it."""
        b, h, q, d = x.shape
        blocks = x.reshape(b, h, q // self.group, self.group, d).transpose(3, 4)
        self.rows.append(blocks.reshape(b, h, q // self.group * d, self.group))

    def clear(self) -> None:
        self.rows.clear()

    def nbytes(self) -> int:
        return self.rows.nbytes()

    def read(self, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantised tokens (batch, heads, n, channels), in ``dtype`` (float32 if None) or
        written into ``out``."""
        rows = self.rows.read()
        b, h = rows.shape[:2]
        x = rows.view(b, h, -1, self.channels, self.group).transpose(3, 4).reshape(b, h, -1, self.channels)
        if out is not None:
            return out.copy_(x)
        return x if dtype is None else x.to(dtype)

    def clone(self) -> "ChannelPackedStore":
        copy = ChannelPackedStore(self.rows.bits, self.group, self.channels)
        copy.rows = self.rows.clone()
        return copy


Store = DenseStore | PackedStore | ChannelPackedStore


def read_followed_by(stores: list[Store], new: torch.Tensor) -> torch.Tensor:
    """Every store's tokens read in turn, followed by ``new``: what a step attends over. Each part is
    written once into the result (no concatenation of copies); with nothing held, ``new`` itself."""
    held = [store for store in stores if store.tokens]
    if not held:
        return new
    out = new.new_empty((*new.shape[:2], sum(s.tokens for s in held) + new.shape[2], new.shape[-1]))
    at = 0
    for store in held:
        store.read(out=out[:, :, at:at + store.tokens])
        at += store.tokens
    out[:, :, at:] = new
    return out
