"""SubGen (Zandieh, Han, Mirrokni, Karbasi 2024, arXiv 2402.06082): attention estimated from a sketch.

There is no public code, and the paper text could not be read from here. What follows the paper's
streaming algorithm as secondary sources summarise it (the project's reference notes on methods):

* per layer and KV head, keys are clustered online: a key within ``delta`` of its nearest centre
  joins that cluster (``n_i += 1``, each of the cluster's ``t`` sample slots is replaced by it with
  probability ``1 / n_i``: a per-slot reservoir, so each slot is a uniform sample of the cluster);
  otherwise it opens a new cluster with itself as centre;
* ``s`` value samples ``(k'_j, v'_j)``: each slot is replaced by ``(k, v)`` with probability
  ``||v||^2 / (mu + ||v||^2)``, then ``mu += ||v||^2`` (each slot an independent l2 sample);
* a query ``q`` gets the softmax normaliser ``tau = sum_i (n_i / t) sum_{k in S_i} e(k)`` and the
  numerator ``z = sum_j (mu / (s ||v'_j||^2)) e(k'_j) v'_j``, with ``e(k) = exp(scaling <q, k>)``;
  both are unbiased, and ``E||z_hat - z||^2 <= mu sum_i e(k_i)^2 / s``.

Reconstructed / chosen here (not from the paper):

* Exact tokens: ``sink_tokens`` first tokens and a recent window stay exact (methods.md: common
  practice, a parameter). Tokens leaving the window enter the sketch. While the whole sequence fits
  the capacity it is simply held exactly (no sketch, exact attention); the first step that exceeds it
  moves everything but the sinks and the recent window into the sketch. The output combines both:
  ``(sum_exact e^l v + z) / (sum_exact e^l + tau)`` with one shared max subtracted from every logit.
  The prompt is attended exactly (use, then compress); once the sketch is in use the estimate serves
  every later step (appended question, decoding). GQA: the query heads of a group share their KV
  head's sketch. Secondary sources say the paper's experiments cluster the prompt offline (greedy
  k-center) after prefill; here the prompt goes through the same online rule as decoded tokens.
* Memory plan (:class:`SketchPlan`): the capacity ``C`` (budget, or ``round(n / ratio)`` of the
  prompt) is counted in token-equivalents of memory, ``2C`` vectors of ``head_dim`` (an exact token is
  a key and a value). ``exact_share * C`` tokens go to sink + recent; of the remaining vectors,
  ``value_share`` go to value samples (2 vectors each: ``s``) and the rest to clusters (centre + ``t``
  samples each: at most ``m`` clusters). ``t`` shrinks if the sketch cannot hold one full cluster;
  if it cannot hold one cluster and one value sample, the method keeps only the exact tokens and
  drops what leaves the window (degenerate case, tiny capacities only).
* Radius: ``delta`` is relative, ``radius = delta * mean ||k||`` over the first keys a head sketches
  (key scales differ by model, layer and head). Once a head has ``m`` clusters, new keys join their
  nearest cluster whatever the distance: the estimator stays unbiased, only its variance grows.
* Bulk insertion: a step's outgoing tokens (the whole prompt minus the exact ones after prefill) are
  clustered in stream order exactly as one-at-a-time insertion would; the reservoir draws are made in
  one go with the same distribution as one-at-a-time draws (per slot: keep the old sample with
  probability ``n_old / n_new``, else a uniform draw among the new members; for values: keep with
  probability ``mu_old / mu_new``, else an l2 draw among the new tokens).
* Seeded RNG per layer (``seed``, ``layer_idx``). Sketch vectors are stored in the cache dtype,
  counts in int32, ``mu`` and the radius in float32; :meth:`SubGenLayer.bytes_held` counts all of it,
  and :meth:`SubGenLayer.tokens_held` reports token-equivalents (stored vectors / 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import _causal_mask
from kvbench.methods import register
from kvbench.methods.base import EvictionLayer, Method, Phase
from kvbench.params import param


@dataclass
class SubGenParams:
    #: first tokens kept exact, never sketched
    sink_tokens: int = param(4, ge=0)
    #: share of the capacity kept as exact tokens (sinks + recent window)
    exact_share: float = param(0.5, ge=0, le=1)
    #: t: reservoir samples per key cluster
    samples_per_cluster: int = param(8, ge=1)
    #: share of the sketch's memory given to value samples (s); the rest holds key clusters
    value_share: float = param(0.5, ge=0, le=1)
    #: cluster radius, relative to the head's mean key norm
    delta: float = param(0.5, ge=0)


@dataclass(frozen=True)
class SketchPlan:
    """How one layer's memory is spent, per KV head."""

    sink: int  # exact first tokens
    recent: int  # exact most recent tokens
    t: int  # samples per cluster
    s: int  # value samples
    clusters: int  # most clusters (m)

    @classmethod
    def for_capacity(cls, capacity: int, params: SubGenParams) -> "SketchPlan":
        sink = min(params.sink_tokens, capacity)
        exact = max(sink, min(capacity, round(params.exact_share * capacity)))
        vectors = 2 * (capacity - exact)  # head_dim-vectors left for the sketch
        s = int(params.value_share * vectors) // 2
        t = min(params.samples_per_cluster, vectors - 2 * s - 1)
        if s < 1 or t < 1:  # no room for one cluster and one value sample: exact tokens only
            return cls(sink, capacity - sink, 0, 0, 0)
        return cls(sink, exact - sink, t, s, (vectors - 2 * s) // (t + 1))


class SubGenLayer(EvictionLayer):
    def __init__(self, method: "SubGen", layer_idx: int):
        super().__init__(method, layer_idx)
        #: set at the end of the first prefill step from the capacity (tests may set it beforehand)
        self.plan: SketchPlan | None = None
        self.generator: torch.Generator | None = None
        self.radius: torch.Tensor | None = None  # (b, h) float32
        self.centres: torch.Tensor | None = None  # (b, h, m, d)
        self.counts: torch.Tensor | None = None  # (b, h, m) int32; 0 = unused slot
        self.samples: torch.Tensor | None = None  # (b, h, m, t, d)
        self.value_keys: torch.Tensor | None = None  # (b, h, s, d)
        self.value_values: torch.Tensor | None = None  # (b, h, s, d)
        self.mu: torch.Tensor | None = None  # (b, h) float32: sum of ||v||^2 of the sketched tokens

    # -- compression ------------------------------------------------------------------------------
    def compress(self, phase: Phase) -> None:
        if self.plan is None:
            self.plan = SketchPlan.for_capacity(self.capacity, self.method.params)
        plan, n = self.plan, self.get_seq_length()
        if self.mu is None and n <= self.capacity:
            return  # everything fits the capacity exactly: no need for a sketch yet
        if n <= plan.sink + plan.recent:
            return
        if plan.clusters:
            leaving = slice(plan.sink, n - plan.recent)
            self._insert(self.keys[:, :, leaving], self.values[:, :, leaving])
        idx = torch.cat([torch.arange(plan.sink), torch.arange(n - plan.recent, n)]).to(self.keys.device)
        self.keep(idx.expand(*self.keys.shape[:2], -1))

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.keys.device)

    def _insert(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``keys``/``values`` (b, h, T, d), in stream order, to the sketch."""
        b, h, T, d = keys.shape
        plan, device = self.plan, keys.device
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.method.seed * 100_003 + self.layer_idx)
            self.centres = keys.new_zeros(b, h, 0, d)
            self.counts = torch.zeros(b, h, 0, dtype=torch.int32, device=device)
            self.samples = keys.new_zeros(b, h, 0, plan.t, d)
            self.value_keys = keys.new_zeros(b, h, plan.s, d)
            self.value_values = keys.new_zeros(b, h, plan.s, d)
            self.mu = torch.zeros(b, h, device=device)
        if self.radius is None:  # relative to the first keys this head sketches (tests may preset it)
            self.radius = self.method.params.delta * keys.float().norm(dim=-1).mean(dim=-1)
        k = keys.float()
        m_old = self.counts.shape[-1]
        centres = torch.zeros(b, h, plan.clusters, d, device=device)
        centres[:, :, :m_old] = self.centres.float()
        n_old = torch.zeros(b, h, plan.clusters, device=device)
        n_old[:, :, :m_old] = self.counts.float()
        assign = self._cluster(k, centres, (n_old > 0).sum(-1))
        members = torch.zeros_like(n_old).scatter_add_(2, assign, torch.ones_like(k[..., 0]))
        n_new = n_old + members
        used = int((n_new > 0).sum(-1).max())

        # cluster reservoirs: per slot, a uniform draw among this step's members (the member with the
        # largest random key), taken with probability members / n_new (1 for a new cluster)
        slots = plan.clusters * plan.t
        u = self._rand(b, h, T, plan.t)
        flat = assign[..., None] * plan.t + torch.arange(plan.t, device=device)  # (b, h, T, t)
        best = torch.full((b, h, slots), -1.0, device=device).scatter_reduce(
            2, flat.flatten(2), u.flatten(2), "amax")
        winner = u.flatten(2) == best.gather(2, flat.flatten(2))
        token = torch.arange(T, device=device)[:, None].expand(T, plan.t).flatten()
        chosen = torch.zeros(b, h, slots + 1, dtype=torch.long, device=device).scatter_(
            2, torch.where(winner, flat.flatten(2), slots), token.expand(b, h, -1))[..., :slots]
        drawn = k.gather(2, chosen[..., None].expand(-1, -1, -1, d)).view(b, h, plan.clusters, plan.t, d)
        take = self._rand(b, h, plan.clusters, plan.t) < (members / n_new.clamp(min=1))[..., None]
        samples = torch.zeros(b, h, plan.clusters, plan.t, d, device=device)
        samples[:, :, :m_old] = self.samples.float()
        samples = torch.where(take[..., None], drawn, samples)

        # value reservoirs: per slot, an l2 draw among this step's tokens with probability W / mu_new
        weight = values.float().pow(2).sum(-1)  # (b, h, T)
        total = weight.sum(-1)
        mu_new = self.mu + total
        rows = torch.where(total[..., None] > 0, weight, torch.ones_like(weight)).view(b * h, T)
        pick = torch.multinomial(rows, plan.s, replacement=True, generator=self.generator).view(b, h, plan.s)
        take = self._rand(b, h, plan.s) < (total / mu_new.clamp(min=torch.finfo(torch.float32).tiny))[..., None]
        index = pick[..., None].expand(-1, -1, -1, d)
        self.value_keys = torch.where(take[..., None], keys.gather(2, index), self.value_keys)
        self.value_values = torch.where(take[..., None], values.gather(2, index), self.value_values)
        self.mu = mu_new

        dtype = keys.dtype
        self.centres = centres[:, :, :used].to(dtype)
        self.counts = n_new[:, :, :used].to(torch.int32)
        self.samples = samples[:, :, :used].to(dtype)

    def _cluster(self, k: torch.Tensor, centres: torch.Tensor, n_clusters: torch.Tensor) -> torch.Tensor:
        """Cluster index (b, h, T) of every key of ``k`` inserted one at a time in order: the nearest
        centre if within the radius or if all ``plan.clusters`` slots are used, else a new cluster
        (written into ``centres``; ``n_clusters`` (b, h) is updated in place).

        Only the tokens that open a cluster need sequential work: the loop jumps from one to the next
        (the earliest over all heads), keeping every token's distance to its nearest centre so far."""
        T, cap = k.shape[2], centres.shape[2]
        dist = torch.cdist(k, centres, compute_mode="donot_use_mm_for_euclid_dist")  # (b, h, T, cap)
        dist = dist.masked_fill(torch.arange(cap, device=k.device) >= n_clusters[..., None, None], float("inf"))
        nearest, assign = dist.min(dim=-1)  # a head without clusters: inf, so its first key opens one
        start = 0
        while start < T:
            opens = (nearest[..., start:] > self.radius[..., None]) & (n_clusters < cap)[..., None]
            if not opens.any():
                break
            first = torch.where(opens.any(-1), opens.int().argmax(-1), T)  # per head, relative to start
            step = int(first.min())
            q = start + step
            heads = first == step  # heads in which token q opens a cluster
            bi, hi = heads.nonzero(as_tuple=True)
            slot = n_clusters.clone()
            centres[bi, hi, slot[bi, hi]] = k[bi, hi, q]
            n_clusters += heads.long()
            to_new = (k[:, :, q:] - k[:, :, q:q + 1]).norm(dim=-1)
            closer = heads[..., None] & (to_new < nearest[..., q:])
            nearest[..., q:] = torch.where(closer, to_new, nearest[..., q:])
            assign[..., q:] = torch.where(closer, slot[..., None], assign[..., q:])
            start = q + 1
        return assign

    # -- attention --------------------------------------------------------------------------------
    def attend(self, query, keys, values, scaling, sliding_window):
        """Exact attention over the held tokens combined with the sketch's estimate of the rest."""
        if self.mu is None:
            return None  # nothing sketched yet: exact attention
        b, hq, q_len, d = query.shape
        h = keys.shape[1]
        group = hq // h
        q = query.float().reshape(b, h, group * q_len, d)  # query head j of KV head i: row block j
        exact = torch.einsum("bhqd,bhnd->bhqn", q, keys.float()) * scaling
        mask = _causal_mask(q_len, keys.shape[2], None, query.device)
        if mask is not None:
            exact = exact.masked_fill(~mask.repeat(group, 1), float("-inf"))
        clustered = torch.einsum("bhqd,bhmtd->bhqmt", q, self.samples.float()) * scaling
        clustered = clustered.masked_fill((self.counts == 0)[:, :, None, :, None], float("-inf"))
        norms = self.value_values.float().pow(2).sum(-1)  # (b, h, s)
        sampled = torch.einsum("bhqd,bhsd->bhqs", q, self.value_keys.float()) * scaling
        sampled = sampled.masked_fill((norms == 0)[:, :, None, :], float("-inf"))

        # one max over every logit (exact, cluster samples, value samples) for all terms: (b, h, rows, 1)
        shift = torch.stack([exact.amax(-1), clustered.flatten(-2).amax(-1), sampled.amax(-1)]).amax(0)[..., None]
        p_exact = (exact - shift).exp()
        p_clustered = (clustered - shift[..., None]).exp().sum(-1)  # (b, h, rows, m)
        p_sampled = (sampled - shift).exp()
        cluster_weight = self.counts.float() / self.plan.t  # n_i / t
        value_weight = self.mu[..., None] / (self.plan.s * norms.clamp(min=torch.finfo(torch.float32).tiny))
        tau = p_exact.sum(-1) + (p_clustered * cluster_weight[:, :, None]).sum(-1)
        z = p_exact @ values.float() + (p_sampled * value_weight[:, :, None]) @ self.value_values.float()
        out = z / tau[..., None]
        return out.reshape(b, hq, q_len, d).to(query.dtype)

    # -- what is held -----------------------------------------------------------------------------
    def _sketch(self) -> list[torch.Tensor]:
        state = (self.radius, self.centres, self.counts, self.samples, self.value_keys, self.value_values, self.mu)
        return [x for x in state if x is not None]

    def tokens_held(self) -> torch.Tensor:
        """Token-equivalents per (batch, KV head): exact tokens + stored sketch vectors / 2."""
        b, h, n, _ = self.keys.shape
        held = torch.full((b, h), float(n))
        if self.counts is not None:
            clusters = (self.counts > 0).sum(-1).float().cpu()
            held += (clusters * (1 + self.plan.t) + 2 * self.plan.s * (self.mu > 0).float().cpu()) / 2
        return held

    def state_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self._sketch())


@register
class SubGen(Method):
    """SubGen's streaming attention estimate (partly reconstructed); see the module docstring."""

    name = "subgen"
    Params = SubGenParams
    layer = SubGenLayer
    phases = ("prefill", "append", "decode")
    approximation_note = (
        "Tokens outside the exact sink and recent window are attended through the sketch's estimate "
        "(clustered keys, sampled values), not exactly, once the sequence exceeds the capacity."
    )
    ratio_note = (
        "SubGen's memory is exact tokens plus a sketch (cluster centres, t samples per cluster, s value "
        "samples, int32 counts, float32 mu and radius), reported as bytes and as token-equivalents "
        "(vectors / 2). The plan fills the capacity only once the clusters are all opened: with keys in "
        "fewer clusters the measured ratio is above nominal; the counts and scalars put it slightly below."
    )
