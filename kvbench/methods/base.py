"""The method interface: a method decides what each attention layer's KV cache keeps.

A run builds one :class:`Method` from its config and calls :meth:`Method.setup` once the model is
loaded; every sample's cache (``kvbench.cache.KVCache``) gets one layer of the method's ``layer``
class per attention layer. The cache calls the layers at four points:

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
``compress(phase)``
    called after a forward step of the model, only in the phases the method declares (``phases``):
    ``"prefill"`` (the compressed part of the prompt), ``"append"`` (a question appended uncompressed
    after the context) and ``"decode"`` (one generated token). Eviction, merging and quantisation
    happen here.

What a layer holds lives in named stores (``kvbench.storage``); the tokens and bytes it holds, what
the full cache would hold and its snapshots are derived from them. Ratio and budget semantics are the
same for every method (see :class:`Compression`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from kvbench.errors import ConfigError
from kvbench.params import parse_params
from kvbench.registry import unknown_name
from kvbench.storage import DenseStore, Store, read_followed_by

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
    #: k: in budget mode, a method that compresses only its prompt re-scores and evicts once it holds
    #: ``k`` tokens more than the budget, so it holds at most ``budget + k - 1`` between steps (1:
    #: every step, a hard capacity)
    evict_every: int = 1

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
        if not self.evict_every >= 1 or (self.evict_every > 1 and self.budget is None):
            raise ConfigError(f"evict_every must be an integer >= 1 and above 1 only with a budget (it bounds the "
                              f"cache by budget + evict_every - 1); got {self.evict_every} with ratio={self.ratio}")

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
            return f"budget-{self.budget}" + (f"_every-{self.evict_every}" if self.evict_every > 1 else "")
        return f"ratio-{self.ratio:g}"


# -- the model as methods see it --------------------------------------------------------------------

def layer_windows(config) -> list[int | None]:
    """Sliding window (tokens) of every attention layer of a model config, None for global layers."""
    config = getattr(config, "text_config", config)
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    window = getattr(config, "sliding_window", None)
    return [window if t == "sliding_attention" else None for t in types[:n]]


def head_dim(config) -> int:
    """Channels per attention head of a model config."""
    config = getattr(config, "text_config", config)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


@dataclass
class LayerState:
    """A copy of one layer's sequence state: its stores and its ``state_fields``."""

    stores: dict[str, Store]
    fields: dict[str, Any]

    def nbytes(self) -> int:
        return (sum(store.nbytes() for store in self.stores.values())
                + sum(v.numel() * v.element_size() for v in self.fields.values() if isinstance(v, torch.Tensor)))


class CacheLayerProtocol:
    """What transformers' ``Cache`` asks of each of its layers, answered from the layer's stores."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    seen: int

    @property
    def is_initialized(self) -> bool:
        return self.seen > 0

    def get_seq_length(self) -> int:
        """Tokens held per head: between steps, what the next step attends over besides its own."""
        return sum(self.stores[name].tokens for name in self.key_stores if name in self.stores)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class KVLayer(CacheLayerProtocol):
    """One attention layer's cache and the method's hooks on it.

    Storage: ``stores`` maps names to stores (``kvbench.storage``). The base layer holds ``keys`` and
    ``values`` (batch, kv_heads, n, head_dim) and ``positions`` (batch, kv_heads, n), the original
    (logical) position of every held token, so tests and analyses can see exactly which tokens
    survived. Keys are stored after RoPE, so a kept token keeps its original position in attention
    whatever is evicted around it, and the held order does not matter to attention: tokens are held
    in position order except after :meth:`evict_one`, which moves the newest token into the freed
    slot, and in MiKV, which hands attention its important tokens before the others.
    """

    #: the stores holding keys and values, in the order the step attends over them; the last one
    #: receives the step's new tokens. Their tokens are what the layer holds.
    key_stores: ClassVar[tuple[str, ...]] = ("keys",)
    value_stores: ClassVar[tuple[str, ...]] = ("values",)
    #: whether its heads may hold different numbers of tokens (AdaKV: the flat layout of
    #: ``kvbench.storage``); methods that rework a base's uniform stores (ThinK, ChunkKV) refuse it
    ragged_heads: ClassVar[bool] = False
    #: attributes besides the stores that hold the sequence's state (not configuration): what a
    #: prefill snapshot copies. Layers that record more before compressing (queries) extend it.
    state_fields: ClassVar[tuple[str, ...]] = ("seen", "kv_shape")

    def __init__(self, method: "Method | None" = None, layer_idx: int = 0):
        self.method = method
        self.layer_idx = layer_idx
        self.stores: dict[str, Store] = self.make_stores()
        self.seen = 0  # tokens ever written to this layer: the logical length of the sequence
        #: (batch, kv_heads, head_dim, dtype) of the model's keys: what the full cache holds per token
        self.kv_shape: tuple[int, int, int, torch.dtype] | None = None
        #: tokens of the prompt, told by generation before the prefill (``KVCache.begin``): with a
        #: chunked prefill the first step sees only the first chunk
        self.prompt_tokens: int | None = None

    def prompt_length(self) -> int:
        """Tokens of the prompt: as told by generation, else what the layer has seen (its first step)."""
        return self.seen if self.prompt_tokens is None else self.prompt_tokens

    def make_stores(self) -> dict[str, Store]:
        """The layer's stores, all aligned token by token (``keep`` and ``evict_one`` act on all)."""
        return {"keys": DenseStore(), "values": DenseStore(), "positions": DenseStore(bookkeeping=True)}

    @property
    def keys(self) -> torch.Tensor | None:
        return self.stores["keys"].tensor

    @property
    def values(self) -> torch.Tensor | None:
        return self.stores["values"].tensor

    @property
    def positions(self) -> torch.Tensor | None:
        return self.stores["positions"].tensor

    # -- the step's new tokens ----------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the step's tokens; return every held key and value, the new ones last."""
        self.append(key_states, value_states)
        return tuple(read_followed_by([self.stores[n] for n in names[:-1] if n in self.stores],
                                      self.stores[names[-1]].tensor)
                     for names in (self.key_stores, self.value_stores))

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store the step's new keys and values with their positions."""
        b, h, q, d = key_states.shape
        self.kv_shape = (b, h, d, key_states.dtype)
        # positions materialised: methods may write into stores in place (bounded)
        pos = torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q).contiguous()
        for name, new in (("keys", key_states), ("values", value_states), ("positions", pos)):
            self.stores[name].append(new)
        self.seen += q

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the tokens at ``idx`` (batch, heads, k), in ascending order of ``idx`` (the
        order they were held in), in every store."""
        idx = idx.sort(dim=-1).values
        for store in self.stores.values():
            store.keep(idx)

    def evict_one(self, slot: torch.Tensor) -> None:
        """Drop the token at index ``slot`` (batch, heads, 1) of every head: the last (newest) token
        moves into its place, so a decoding step moves one token instead of rewriting the cache.

        The held tokens' order then stops following their positions: only methods that choose by
        score or by ``positions``, never by index order, call it (during decoding, when the cache
        is one token over its capacity)."""
        for store in self.stores.values():
            store.evict_one(slot)

    # -- hooks for methods --------------------------------------------------------------------------
    def observe(self, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> None:
        """See the step's queries (batch, q_heads, q_len, head_dim) before attention."""

    def attend(self, query, keys, values, scaling, sliding_window) -> torch.Tensor | None:
        """Return an attention output (batch, q_heads, q_len, head_dim) to replace exact attention."""
        return None

    def end_step(self, phase: Phase) -> None:
        """Called after every forward step: the method compresses in the phases it declares."""
        if phase in self.method.phases:
            self.compress(phase)

    def compress(self, phase: Phase) -> None:
        """Compress after a forward step of one of the method's ``phases``."""

    # -- what is held -------------------------------------------------------------------------------
    def tokens_held(self) -> torch.Tensor:
        """Tokens held per (batch, kv_head)."""
        b, h = self.kv_shape[:2]
        return torch.full((b, h), self.get_seq_length(), dtype=torch.long)

    def state_bytes(self) -> int:
        """Bytes of KV state the layer holds outside its stores (SubGen's sketch, MiKV's balancer)."""
        return 0

    def bytes_held(self) -> int:
        """Bytes of KV storage really held: the stores' (quantisation scales included, bookkeeping
        such as positions and scores excluded) plus :meth:`state_bytes`."""
        return sum(s.nbytes() for s in self.stores.values() if not s.bookkeeping) + self.state_bytes()

    def bytes_read(self) -> int:
        """Bytes of KV storage the last forward step read: by default everything held (the step
        attended over its whole cache); a layer that attends over part of it (Quest) says less."""
        return self.bytes_held()

    def full_tokens(self) -> int:
        """Tokens per head the uncompressed cache would hold for the same sequence."""
        return self.seen

    def bytes_full(self) -> int:
        """Bytes the uncompressed cache would hold for the same sequence."""
        return self.full_tokens() * self.token_bytes()

    def token_bytes(self) -> int:
        """Bytes of one uncompressed token (its key and value for every batch row and KV head)."""
        b, h, d, dtype = self.kv_shape
        return 2 * b * h * d * dtype.itemsize

    def capacity_bytes(self, capacity: int) -> int:
        """Most bytes the layer holds between steps when it holds at most ``capacity`` in its
        method's ``budget_unit``: what a capacity of that many tokens costs in its stores."""
        return capacity * self.token_bytes()

    # -- snapshots ----------------------------------------------------------------------------------
    def snapshot(self) -> LayerState:
        """A copy of the sequence state (stores and ``state_fields``), independent of later in-place
        updates."""
        return LayerState({name: store.clone() for name, store in self.stores.items()},
                          {name: _clone(getattr(self, name)) for name in self.state_fields})

    def restore(self, state: LayerState) -> None:
        self.stores = {name: store.clone() for name, store in state.stores.items()}
        for name, value in state.fields.items():
            setattr(self, name, _clone(value))


class EvictionLayer(KVLayer):
    """Base for methods that keep a subset of tokens: computes the capacity once the prompt is in.

    ``capacity`` is fixed at the end of the first prefill step from the prompt length (the whole
    prompt's, also when it is prefilled in chunks) and then kept for the rest of the sample, so
    decode-time evictions hold the cache at the same size.
    """

    def __init__(self, method: "Method", layer_idx: int):
        super().__init__(method, layer_idx)
        self.capacity: int | None = None

    def end_step(self, phase: Phase) -> None:
        if self.capacity is None:
            self.capacity = self.method.compression.capacity(self.prompt_length())
        super().end_step(phase)


class ScoreKeepLayer(EvictionLayer):
    """Eviction by score: once the cache holds more than its capacity, it keeps the
    :meth:`kept_tokens` (the capacity) tokens with the highest :meth:`score` (the lowest with
    ``keep_highest = False``). A method writes ``score`` and, if its choice is not a plain top-k,
    :meth:`choose`.

    Budget mode holds the budget in every phase: a method that compresses only in some phases
    (SnapKV: the prefill) re-scores the held tokens and keeps ``kept_tokens()`` again after a step of
    another phase (an appended question, a decoding step) once the layer holds ``evict_every`` tokens
    more than that, so between steps it holds at most ``budget + evict_every - 1``. In ratio mode
    only the declared phases compress."""

    keep_highest: ClassVar[bool] = True

    def score(self) -> torch.Tensor:
        """A score (batch, kv_heads or 1, n) for every held token: 1 head = the same tokens for all heads."""
        raise NotImplementedError

    def kept_tokens(self) -> int:
        """Tokens this layer keeps when it compresses: the capacity (PyramidKV: its layer's share)."""
        return self.capacity

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices (batch, heads or 1, k) of the tokens to keep."""
        return scores.topk(self.kept_tokens(), dim=-1, largest=self.keep_highest).indices

    def end_step(self, phase: Phase) -> None:
        super().end_step(phase)
        compression = self.method.compression
        if (phase not in self.method.phases and compression.budget is not None
                and self.get_seq_length() >= self.kept_tokens() + compression.evict_every):
            self.evict()

    def compress(self, phase: Phase) -> None:
        if self.get_seq_length() <= self.capacity:
            return
        self.evict()

    def evict(self) -> None:
        """Keep the tokens :meth:`choose` picks by :meth:`score`."""
        # scores may be on another device (random's CPU generator) or shared by all heads (TOVA)
        idx = self.choose(self.score()).to(self.keys.device)
        self.keep(idx.expand(*self.keys.shape[:2], -1))


@dataclass
class NoParams:
    """Methods without parameters of their own."""


class Method:
    """A compression method, declared by class attributes.

    ``name`` (registry key and ``method=<name>``), ``Params`` (a dataclass whose fields are the
    parameters: defaults are the paper's, bounds declared with ``params.param``; the Hydra config
    ``method/<name>`` is generated from it), ``layer`` (the :class:`KVLayer` class built for every
    attention layer) and ``phases`` (the phases whose ``end_step`` calls the layer's ``compress``,
    recorded in results).
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    layer: ClassVar[type[KVLayer]] = KVLayer
    phases: ClassVar[tuple[Phase, ...]] = ()
    #: methods whose result does not depend on ratio or budget (``full``) record a single setting
    uses_compression: ClassVar[bool] = True
    #: the prefill forward (attention output and every stored or ``state_fields`` value before
    #: ``end_step``) does not depend on ratio or budget, so one prefill can serve every ratio of a
    #: sweep (checked for every method that declares it by the shared prefill-reuse tests). True of
    #: every compressing method here: they compress only in ``end_step``.
    shares_prefill: ClassVar[bool] = True
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
    #: what ``budget`` counts, per layer and KV head (the capacity table of the docs); methods whose
    #: memory is not a number of tokens say what it is instead (bytes, token-equivalents)
    budget_unit: ClassVar[str] = "tokens"
    #: whether every layer holds the bound (False: the mean over layers does, PyramidKV's shares)
    budget_per_layer: ClassVar[bool] = True
    #: why the method takes no budget (a ConfigError when given one); None: it holds one
    budget_refusal: ClassVar[str | None] = None
    #: whether ``budget`` bounds what the cache holds (False: it names something else, such as the
    #: tokens Quest's decoding steps read, and ``budget_bounds`` says what is held instead)
    budget_is_capacity: ClassVar[bool] = True

    def __init__(self, params: Any, compression: Compression | None, seed: int = 0):
        self.params = params
        self.compression = compression
        self.seed = seed
        #: indices of the layers this method compresses (not sliding-window ones), set by ``setup``
        self.compressed_layers: list[int] | None = None

    def setup(self, model) -> None:
        """Learn what the method needs of the loaded model, once, before the first sample; raise
        ``ConfigError`` for what the model makes impossible (head sizes the codes cannot pack)."""
        self.compressed_layers = [i for i, w in enumerate(layer_windows(model.config)) if not w]

    def make_layer(self, layer_idx: int) -> KVLayer:
        return self.layer(self, layer_idx)

    @classmethod
    def parse_params(cls, values: dict[str, Any]) -> Any:
        """Build ``Params`` from a config mapping, every value checked against its declared type and
        bounds (``params.parse_params``), then against the others (:meth:`check_params`)."""
        params = parse_params(cls.name, cls.Params, values)
        cls.check_params(params)
        return params

    @classmethod
    def check_params(cls, params: Any) -> None:
        """Checks that involve several parameters (``ConfigError``); bounds of one are declared."""

    @classmethod
    def rescores_for_budget(cls) -> bool:
        """Whether budget mode adds a decode-time policy to a method that compresses only its prompt
        (:class:`ScoreKeepLayer`: re-score and evict every ``evict_every`` steps)."""
        return issubclass(cls.layer, ScoreKeepLayer) and "decode" not in cls.phases

    @classmethod
    def budget_bounds(cls) -> tuple[str, str]:
        """The most the cache holds in budget mode, in ``budget_unit`` per layer and KV head, after a
        prefill step and after a decoding step, in words: the capacity table of the docs
        (``kvbench.methods.capacity_table``). :meth:`held_bound` gives the same as numbers."""
        return "budget", "budget + evict_every - 1" if cls.rescores_for_budget() else "budget"

    def held_bound(self, phase: Phase) -> int:
        """The most a layer holds between steps of ``phase`` in budget mode (see :meth:`budget_bounds`)."""
        budget = self.compression.budget
        if phase != "prefill" and self.rescores_for_budget():
            return budget + self.compression.evict_every - 1
        return budget

    def describe(self) -> dict[str, Any]:
        """What determines the method's results, as recorded with them."""
        return {"name": self.name, "params": dataclasses.asdict(self.params), "phases": list(self.phases)}


class MethodOverBase(Method):
    """A method that runs on top of a score-based base method (``params.base``, built with its own
    default parameters): ChunkKV, AdaKV. Its ``layer`` is mixed in before the base's layer class, so
    the base's ``score`` (and state) meet the method's choice; the base's layers compress in this
    method's ``phases`` only. ``bases()`` names the valid bases; ``layer_attributes`` sets the mixed
    class's attributes from the parameters."""

    @classmethod
    def bases(cls) -> list[str]:
        raise NotImplementedError

    @classmethod
    def check_params(cls, params) -> None:
        valid = cls.bases()
        if params.base not in valid:
            raise unknown_name(f"{cls.name} base method", params.base, valid)

    def layer_attributes(self, params) -> dict[str, Any]:
        return {}

    def __init__(self, params, compression, seed=0):
        from kvbench.methods import build_method  # the registry imports this module

        super().__init__(params, compression, seed)
        self.base = build_method(params.base, {}, compression, seed)
        # the base builds its layers (CAKE groups those of a cache) with this method's layer mixed in
        base_layer = type(self.base).layer
        self.base.layer = type(f"{self.layer.__name__.removesuffix('Layer')}{base_layer.__name__}",
                               (self.layer, base_layer), self.layer_attributes(params))
        self.base.phases = self.phases
        # a base with per-layer shares (PyramidKV, CAKE) bounds the mean over layers in budget mode
        self.budget_per_layer = self.base.budget_per_layer

    def setup(self, model) -> None:
        super().setup(model)
        self.base.setup(model)

    def make_layer(self, layer_idx: int):
        return self.base.make_layer(layer_idx)
