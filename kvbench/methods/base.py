"""The method interface: a method decides what each attention layer's KV cache keeps.

A run builds one fresh :class:`Method` from its config; the method builds one :class:`KVLayer` per
attention layer of the model. The cache (``kvbench.cache.KVCache``) calls the layers at four points:

``update(keys, values)``
    called inside each attention module with the new keys/values of this forward step; returns the
    keys/values the step attends over. The base layer appends and returns everything, so the step
    that triggers a compression still attends over the uncompressed cache ("use, then compress").
``observe(query, keys, scaling)``
    called by kvbench's attention function with the step's queries, before attention. Methods that
    score tokens by a few queries' attention (SnapKV, TOVA, G-KV) record what they need here; the
    default does nothing, so attention-free methods work with any kernel.
``attend(query, keys, values, scaling, sliding_window)``
    may compute the step's attention output itself: an estimate (SubGen), or exact attention whose
    probabilities the method also needs (H2O and MiKV sum every query's, so computing them once
    replaces a second attention); ``None`` = kvbench computes exact attention with SDPA.
``end_step(phase)``
    called once per layer after every forward step of the model: ``"prefill"`` (the compressed part of
    the prompt), ``"append"`` (a question appended uncompressed after the context) and ``"decode"``
    (one generated token). Eviction, merging and quantisation happen here.

Ratio and budget semantics are the same for every method (see :class:`Compression`). Layers report
what they really hold (:meth:`KVLayer.tokens_held`, :meth:`KVLayer.bytes_held`), never the nominal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from kvbench.errors import ConfigError

Phase = Literal["prefill", "append", "decode"]


@dataclass(frozen=True)
class Compression:
    """How much a method must compress: exactly one of ``ratio`` or ``budget``.

    ``ratio`` = uncompressed KV bytes / KV bytes held (>= 1). For eviction methods, whose kept tokens
    cost as much as uncompressed ones, it means keeping ``round(n / ratio)`` tokens per layer and head
    of an ``n``-token prompt. ``budget`` = tokens kept per layer and head (the predefined-capacity
    mode), whatever the prompt length. Quantising methods interpret the ratio as a memory ratio.
    """

    ratio: float | None = None
    budget: int | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.budget is None):
            raise ConfigError(
                "give exactly one of ratio (uncompressed/held bytes, >= 1) or budget (tokens per layer "
                f"and head, >= 1); got ratio={self.ratio}, budget={self.budget}"
            )
        if self.ratio is not None and not self.ratio >= 1:
            raise ConfigError(f"ratio must be >= 1 (uncompressed bytes / held bytes), got {self.ratio}")
        if self.budget is not None and not self.budget >= 1:
            raise ConfigError(f"budget must be >= 1 token per layer and head, got {self.budget}")

    def capacity(self, n_tokens: int) -> int:
        """Tokens a layer may hold per head, fixed once the ``n_tokens`` of the prompt are in.

        A budget is the capacity itself (the cache may grow up to it during decoding); a ratio keeps
        ``round(n / ratio)`` of the prompt's tokens."""
        if self.budget is not None:
            return self.budget
        return max(1, round(n_tokens / self.ratio))

    @property
    def label(self) -> str:
        """Directory-safe name of the setting: ``ratio-4`` or ``budget-256``."""
        if self.budget is not None:
            return f"budget-{self.budget}"
        return f"ratio-{self.ratio:g}"


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens along dim 2 of ``x`` (batch, heads, n, ...) with ``idx`` (batch, heads, k)."""
    if x.dim() == 3:
        return torch.gather(x, 2, idx)
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def _growth(n: int) -> int:
    """Spare token slots allocated when a token field of ``n`` tokens outgrows its buffer: an eighth
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


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class KVLayer:
    """One attention layer's cache: dense keys/values of shape (batch, kv_heads, n, head_dim).

    Keeps the original (logical) position of every held token in ``positions`` (batch, kv_heads, n),
    so tests and analyses can see exactly which tokens survived. Keys are stored after RoPE, so a kept
    token keeps its original position in attention whatever is evicted around it, and the held order
    does not matter to attention: tokens are held in position order except after
    ``EvictionLayer.evict_one``, which moves the newest token into the freed slot, and in MiKV, which
    hands attention its important tokens before the others.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    #: attributes that hold the sequence's state (not configuration): what a prefill snapshot copies.
    #: Layers that keep more per-sequence state before compressing (accumulated scores) extend it.
    state_fields: ClassVar[tuple[str, ...]] = ("keys", "values", "positions", "seen")
    #: the tensors with one entry per held token along dim 2, which ``keep`` selects from
    token_fields: ClassVar[tuple[str, ...]] = ("keys", "values", "positions")

    def __init__(self, method: "Method | None" = None, layer_idx: int = 0):
        self.method = method
        self.layer_idx = layer_idx
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.seen = 0  # tokens ever written to this layer: the logical length of the sequence
        self._buffers: dict[str, torch.Tensor] = {}  # storage behind the token fields (append_tokens)

    # -- transformers' cache-layer protocol -------------------------------------------------------
    @property
    def is_initialized(self) -> bool:
        return self.keys is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.append(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # -- storage ----------------------------------------------------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, q, _ = key_states.shape
        pos = torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q)
        if self.keys is None:
            # positions materialised: methods may write into token fields in place (bounded)
            self.keys, self.values, self.positions = key_states, value_states, pos.contiguous()
        else:
            for name, new in (("keys", key_states), ("values", value_states), ("positions", pos)):
                self.append_tokens(name, new)
        self.seen += q

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the tokens at ``idx`` (batch, heads, k), in ascending order of ``idx`` (the
        order they were held in)."""
        idx = idx.sort(dim=-1).values
        for name in self.token_fields:
            self.set_tokens(name, gather_tokens(getattr(self, name), idx))

    # A token field is a prefix view of a larger buffer (``append_along_tokens``), so that appending a
    # decoded token writes into spare room instead of copying the whole cache (``torch.cat``). A
    # method that assigns a field directly just gets a new buffer at the next append.
    # ``bytes_held`` counts the tokens held, which is what a method controls. A field that shrinks far
    # below its buffer (a prompt compressed to its capacity) gets a compact tensor, so the
    # prompt-sized storage is freed.
    def append_tokens(self, name: str, new: torch.Tensor) -> None:
        """Append ``new`` along the token axis of field ``name``."""
        held, self._buffers[name] = append_along_tokens(getattr(self, name), new, self._buffers.get(name))
        setattr(self, name, held)

    def set_tokens(self, name: str, tensor: torch.Tensor) -> None:
        """Make ``tensor`` (a new tensor, not a view of the field) the field's content."""
        buffer, k = self._buffers.get(name), tensor.shape[2]
        if buffer is not None and buffer.shape[:2] == tensor.shape[:2] and _roomy(buffer, k):
            buffer[:, :, :k] = tensor
            tensor = buffer[:, :, :k]
        else:
            self._buffers.pop(name, None)
        setattr(self, name, tensor)

    def truncate_tokens(self, name: str, k: int) -> None:
        """Keep the first ``k`` tokens of the field."""
        held, buffer = getattr(self, name), self._buffers.get(name)
        if buffer is not None and _is_prefix(held, buffer) and _roomy(buffer, k):
            setattr(self, name, buffer[:, :, :k])
        else:
            self._buffers.pop(name, None)
            setattr(self, name, held[:, :, :k].clone())

    def snapshot(self) -> dict[str, Any]:
        """A copy of the sequence state (``state_fields``), independent of later in-place updates."""
        return {name: _clone(getattr(self, name)) for name in self.state_fields}

    def restore(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, _clone(value))

    # -- hooks for methods ------------------------------------------------------------------------
    def observe(self, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> None:
        """See the step's queries (batch, q_heads, q_len, head_dim) before attention."""

    def attend(self, query, keys, values, scaling, sliding_window) -> torch.Tensor | None:
        """Return an attention output (batch, q_heads, q_len, head_dim) to replace exact attention."""
        return None

    def end_step(self, phase: Phase) -> None:
        """Compress after a forward step, if the method does so in this phase."""

    # -- what is held -----------------------------------------------------------------------------
    def tokens_held(self) -> torch.Tensor:
        """Tokens held per (batch, kv_head)."""
        b, h = self.keys.shape[:2]
        return torch.full((b, h), self.keys.shape[-2], dtype=torch.long)

    def bytes_held(self) -> int:
        """Bytes of KV storage really held (tensors' storage, quantisation scales included)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def bytes_full(self) -> int:
        """Bytes the uncompressed cache would hold for the same sequence."""
        b, h, _, d = self.keys.shape
        return 2 * b * h * self.seen * d * self.keys.element_size()


class SlidingWindowLayer(KVLayer):
    """A sliding-window attention layer (Gemma 3's local layers): its cache is bounded already.

    kvbench's documented policy: methods do not compress these layers (as kvpress does for Gemma 3);
    the layer keeps the last ``window - 1`` tokens after each step, exactly as transformers' own
    sliding-window cache, and the full-cache baseline holds the same, so bytes stay comparable.
    """

    is_sliding = True

    def __init__(self, window: int, layer_idx: int = 0):
        super().__init__(None, layer_idx)
        self.window = window

    def end_step(self, phase: Phase) -> None:
        n = self.get_seq_length()
        if n >= self.window:
            start = n - (self.window - 1)
            self.keys = self.keys[:, :, start:]
            self.values = self.values[:, :, start:]
            self.positions = self.positions[:, :, start:]

    def bytes_full(self) -> int:
        b, h, _, d = self.keys.shape
        return 2 * b * h * min(self.seen, self.window - 1) * d * self.keys.element_size()


class EvictionLayer(KVLayer):
    """Base for methods that keep a subset of tokens: computes the capacity once the prompt is in.

    ``capacity`` is fixed at the end of the first prefill step from the prompt length and then kept
    for the rest of the sample, so decode-time evictions hold the cache at the same size.
    """

    def __init__(self, method: "Method", layer_idx: int):
        super().__init__(method, layer_idx)
        self.capacity: int | None = None

    def end_step(self, phase: Phase) -> None:
        if self.capacity is None:
            self.capacity = self.method.compression.capacity(self.seen)
        self.compress(phase)

    def compress(self, phase: Phase) -> None:
        raise NotImplementedError

    def evict_one(self, slot: torch.Tensor) -> None:
        """Drop the token at index ``slot`` (batch, heads, 1) of every head: the last (newest) token
        moves into its place, so a decoding step moves one token instead of rewriting the cache.

        The held tokens' order then stops following their positions: only methods that choose by
        score or by ``positions``, never by index order, call it (during decoding, when the cache
        is one token over its capacity)."""
        n = self.get_seq_length()
        for name in self.token_fields:
            held = getattr(self, name)
            index = slot if held.dim() == 3 else slot[..., None].expand(*slot.shape, held.shape[-1])
            newest = held[:, :, n - 1:].clone()  # may be the dropped token itself
            held.scatter_(2, index, newest)
            self.truncate_tokens(name, n - 1)


@dataclass
class NoParams:
    """Methods without parameters of their own."""


class Method:
    """A compression method: class attributes describe it, ``make_layer`` builds its cache layers.

    Subclasses set ``name`` (registry key), ``Params`` (a dataclass whose defaults are the paper's and
    must equal ``conf/method/<name>.yaml``), ``phases`` (where it compresses, recorded in results) and
    ``needs_queries`` (it scores tokens with attention, so the attention kernel must hand it queries).

    ``needs_queries`` never makes a combination unsupported here: models always run with kvbench's own
    attention function (``attn_implementation="kvbench"``, set by the model loader), which calls
    ``observe`` with the step's queries on every step whatever computes the attention output, and
    the scores are recomputed from those queries and the cached keys (``methods/scores.py``), never
    read from the kernel. So there is no FlashAttention-style kernel to reject at start-up.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    phases: ClassVar[tuple[str, ...]] = ()
    needs_queries: ClassVar[bool] = False
    #: methods whose result does not depend on ratio or budget (``full``) record a single setting
    uses_compression: ClassVar[bool] = True
    #: the prefill forward (attention output and every ``state_fields`` value before ``end_step``)
    #: does not depend on ratio or budget, so one prefill can serve every ratio of a sweep
    #: (checked for every method that sets it by the shared method matrix)
    shares_prefill: ClassVar[bool] = False
    #: why the measured memory ratio legitimately differs from the nominal one (None: it must match)
    ratio_note: ClassVar[str | None] = None
    #: why outputs differ from the full cache even when nothing is evicted (None: a budget above the
    #: sequence length must reproduce the full cache exactly)
    lossy_note: ClassVar[str | None] = None
    #: why, once it compresses, the cache is not an exact subset of the sequence's keys and values
    #: attended exactly (tokens merged, attention estimated); None: it is, and the shared method
    #: matrix checks decoding against a reference forward masked to the kept tokens. A
    #: ``lossy_note`` implies it.
    approximation_note: ClassVar[str | None] = None
    #: indices of the layers this method compresses, set by ``KVCache`` before it builds them (for
    #: methods whose budget depends on depth, such as PyramidKV)
    compressed_layers: list[int] | None = None

    def __init__(self, params: Any, compression: Compression | None, seed: int = 0):
        self.params = params
        self.compression = compression
        self.seed = seed

    def make_layer(self, layer_idx: int) -> KVLayer:
        raise NotImplementedError

    @classmethod
    def parse_params(cls, values: dict[str, Any]) -> Any:
        """Build ``Params`` from a config mapping, naming unknown keys and the valid ones."""
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(
                f"method '{cls.name}' has no parameter(s) {unknown}; valid: {sorted(fields) or 'none'}"
            )
        params = cls.Params(**values)
        validate = getattr(params, "validate", None)
        if validate is not None:
            validate()
        return params

    def describe(self) -> dict[str, Any]:
        """What the results record about the method."""
        return {
            "name": self.name,
            "params": dataclasses.asdict(self.params),
            "phases": list(self.phases),
            "sliding_window_layers": "not compressed (window-bounded cache kept as the full cache does)",
        }
