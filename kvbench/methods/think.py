"""ThinK (Xu et al. 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018;
code SalesforceAIResearch/ThinK, ``ThinK_flash/src/kv_pruning_utils.py``; kvpress's ``ThinKPress``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvbench.errors import ConfigError
from kvbench.methods import build_method, method_class, register, registered
from kvbench.methods.base import KVLayer, Method, Phase
from kvbench.params import param
from kvbench.methods.scores import last_queries
from kvbench.storage import DenseStore

#: what ThinK runs on when no base is given: every token kept
NO_EVICTION = "full"


@dataclass
class ThinKParams:
    #: fraction of key channels pruned per layer and KV head (lambda; 0.4 in the authors' code)
    key_channel_compression_ratio: float = param(0.4, ge=0, le=1)
    #: observation window: the last prompt queries whose energy scores the channels (32 in ThinK and kvpress)
    window: int = param(32, ge=1)
    #: the most recent held tokens, whose keys keep every channel (the authors' recent_size)
    recent: int = param(32, ge=0)
    #: the token-eviction method run first (its default parameters), or null: channels only
    base: str | None = param("snapkv")


def channel_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """ThinK's importance (batch, kv_heads, d) of every key channel: ``mean_t q_c^2 * mean_t k_c^2``.

    ``query`` (batch, q_heads, w, d) are the observation window's queries, ``keys`` (batch, kv_heads,
    n, d) the held keys. Per channel this is ``||Q[:, c] K[:, c]^T||_F^2 / (w n)`` (the outer product's
    Frobenius norm is the product of the two column norms), the paper's criterion; the query energy
    of the query heads sharing a KV head is averaged, as kvpress does."""
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    q_energy = query.float().pow(2).mean(dim=2).view(b, hkv, hq // hkv, d).mean(dim=2)
    return q_energy * keys.float().pow(2).mean(dim=2)


class PrunedChannelStore:
    """Keys with channels pruned: the kept channels' values (batch, heads, n, d') and which channels
    they are, ``kept`` (batch, heads, d'), both counted as held bytes. ``read`` puts them back at
    their channels with zeros in the pruned ones, so attention's ``q . k`` runs over the kept
    channels only (ThinK's pruned query times pruned key). Filled once after the prefill and never
    evicted from (ThinK's bases evict only the prompt, before pruning)."""

    bookkeeping = False

    def __init__(self, kept: torch.Tensor, channels: int):
        self.kept, self.channels = kept, channels
        self.part = DenseStore()

    @property
    def tokens(self) -> int:
        return self.part.tokens

    def append(self, keys: torch.Tensor) -> None:
        """Add ``keys`` (batch, heads, q, channels), keeping the ``kept`` channels."""
        self.part.append(keys.gather(-1, self.kept[:, :, None, :].expand(*keys.shape[:3], -1)))

    def nbytes(self) -> int:
        return self.part.nbytes() + self.kept.numel() * self.kept.element_size()

    def read(self, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        held = self.part.tensor
        if out is None:
            out = held.new_empty((*held.shape[:3], self.channels), dtype=dtype or held.dtype)
        out.zero_().scatter_(-1, self.kept[:, :, None, :].expand(*held.shape), held.to(out.dtype))
        return out

    def clone(self) -> PrunedChannelStore:
        copy = PrunedChannelStore(self.kept.clone(), self.channels)
        copy.part = self.part.clone()
        return copy


class ThinKLayer(KVLayer):
    """Combined with the base method's layer class (:func:`think_layer`), whose ``method`` is the base
    method and whose eviction runs first. After the prefill it moves the held keys, the ``recent``
    last excepted, into ``pruned_keys`` with the lowest-scoring channels dropped; the recent keys
    and every later token keep all channels in ``keys``. Values are never pruned."""

    key_stores = ("pruned_keys", "keys")
    state_fields = KVLayer.state_fields + ("channel_query",)

    think: ThinK
    channel_query: torch.Tensor | None = None

    def observe(self, query, keys, scaling):
        self.channel_query = last_queries(query, self.think.params.window)
        super().observe(query, keys, scaling)

    def end_step(self, phase: Phase) -> None:
        super().end_step(phase)  # the base's flow: its capacity, its compress in its own phases
        if phase == "prefill" and phase not in self.method.phases:
            self.compress(phase)  # no eviction in the prefill: prune the channels alone

    def compress(self, phase: Phase) -> None:
        super().compress(phase)  # the base's eviction first: ThinK scores the keys it keeps
        if phase == "prefill":
            self.prune_channels()

    def prune_channels(self) -> None:
        keys = self.stores["keys"].tensor
        b, h, n, d = keys.shape
        pruned = int(d * self.think.params.key_channel_compression_ratio)
        older = n - min(self.think.params.recent, n)
        if pruned == 0 or older == 0:
            return
        dropped = channel_scores(self.channel_query, keys).topk(pruned, dim=-1, largest=False).indices
        keep = torch.ones(b, h, d, dtype=torch.bool, device=keys.device).scatter_(-1, dropped, False)
        kept = torch.arange(d, device=keys.device).expand(b, h, d)[keep].view(b, h, d - pruned)
        store = PrunedChannelStore(kept, d)
        store.append(keys[:, :, :older])
        self.stores["pruned_keys"] = store
        self.stores["keys"].set(keys[:, :, older:].clone())  # compact: the prompt-sized tensor is freed


@functools.cache
def think_layer(base: type[KVLayer]) -> type[KVLayer]:
    """The layer class of ThinK over a base method's layer class: ThinK's hooks first, then the base's."""
    fields = tuple(dict.fromkeys(base.state_fields + ThinKLayer.state_fields))
    return type(f"ThinK{base.__name__}", (ThinKLayer, base), {"state_fields": fields})


def eligible_bases() -> list[str]:
    """Methods ThinK can run on: those that evict only the prompt (or nothing) and hold plain keys
    and values attended exactly, so the pruned keys are never evicted from afterwards."""
    return sorted(name for name, cls in registered().items()
                  if set(cls.phases) <= {"prefill"} and cls.layer.key_stores == ("keys",)
                  and cls.layer.value_stores == ("values",) and not (cls.lossy_note or cls.approximation_note)
                  and not cls.layer.ragged_heads and name != "think")


@register
class ThinK(Method):
    """ThinK: prune the least important key channels, per layer and KV head, after the prefill.

    - Importance of key channel ``c``: ``||Q_w[:, c] K[:, c]^T||_F`` over the last ``window`` prompt
      queries ``Q_w`` (after RoPE) and the held keys ``K`` (:func:`channel_scores`; computed as
      kvpress and the authors' code do, as the product of the mean squares, which ranks the same).
      The ``int(d * key_channel_compression_ratio)`` lowest-scoring channels are pruned.
    - As in the authors' code: the keys scored and pruned are those the base method kept (ThinK runs
      after SnapKV or H2O there); the ``recent`` most recent held keys keep every channel, and so do
      all later tokens (an appended question, decoded tokens). Values keep every channel.
    - Per KV head: kvbench holds one key per KV head, so the query heads of a GQA group share the
      pruned channels and their query energy is averaged (kvpress's rule; the authors' code repeats
      keys per query head, on MHA models). The kept channel indices are stored with the keys
      (``PrunedChannelStore``) and counted in ``bytes_held``.
    - Attention: pruned channels read back as zeros, so ``q . k`` runs over the kept channels, as
      ThinK's pruned query times pruned key does.
    - ``base``: the token-eviction method run first, with its default parameters, on the whole
      ``ratio`` or ``budget`` (SnapKV by default, as in ThinK's experiments; any method that
      evicts only the prompt: the authors' H2O is a one-shot prompt eviction, kvbench's ``h2o``
      evicts while decoding and is refused). ``base: null`` prunes channels alone (kvpress's ThinKPress): every
      token is kept, so the only compression setting it takes is ``ratio=1``, and the channel
      pruning shows in the measured ratio.
    """

    name = "think"
    Params = ThinKParams
    layer = ThinKLayer
    phases = ("prefill",)
    ratio_note = ("the ratio or budget applies to the base method's tokens; pruning key channels on top "
                  "makes the measured ratio higher (about ratio / (1 - key_channel_compression_ratio / 2) "
                  "outside the recent window), and the kept channel indices are counted")
    lossy_note = "key channels are pruned even when no token is evicted"
    budget_refusal = ("its pruned keys are stored apart after the prefill and never evicted again, so it "
                      "cannot re-score and evict while decoding as a budget requires")

    def __init__(self, params, compression, seed: int = 0):
        super().__init__(params, compression, seed)
        if compression is not None and compression.budget is not None:
            raise ConfigError(f"think takes no budget: {self.budget_refusal}; give ratio= instead")
        base = params.base or NO_EVICTION
        if base == NO_EVICTION and compression.ratio != 1:
            raise ConfigError(f"think without a base evicts no tokens, so ratio={compression.ratio}, "
                              f"budget={compression.budget} cannot apply: give ratio=1 (the channel pruning "
                              "shows in the measured ratio) or method.base=<an eviction method>, one of "
                              f"{', '.join(n for n in eligible_bases() if n != NO_EVICTION)}")
        self.base = build_method(base, {}, compression, seed)
        self.phases = tuple(dict.fromkeys(("prefill",) + self.base.phases))
        self.shares_prefill = self.base.shares_prefill or base == NO_EVICTION

    @classmethod
    def check_params(cls, params: ThinKParams) -> None:
        if params.base is not None and params.base not in eligible_bases():
            method_class(params.base)  # an unknown name gets the registry's message
            raise ConfigError(f"think.base={params.base}: ThinK prunes the keys that a prompt-only eviction "
                              f"keeps; choose one of {', '.join(eligible_bases())}, or null")

    def setup(self, model) -> None:
        super().setup(model)
        self.base.setup(model)

    def make_layer(self, layer_idx: int) -> KVLayer:
        layer = think_layer(self.base.layer)(self.base, layer_idx)
        layer.think = self
        return layer
