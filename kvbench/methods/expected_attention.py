from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.errors import ConfigError
from kvbench.methods import register
from kvbench.methods.base import Method, ScoreKeepLayer, layer_windows
from kvbench.params import param


@dataclass
class ExpectedAttentionParams:
    #: future positions whose RoPE rotations are averaged (kvpress's ``n_future_positions``)
    n_future_positions: int = param(512, ge=1)
    #: first tokens always kept and left out of the query statistics and of the softmax (``n_sink``)
    n_sink: int = param(4, ge=0)
    #: add the queries' covariance term to the expected logits (``use_covariance``)
    use_covariance: bool = param(True)
    #: multiply the scores by the values' L2 norms (``use_vnorm``)
    use_vnorm: bool = param(True)
    #: added to the scores before the value-norm rescaling (``epsilon``)
    epsilon: float = param(0.0, ge=0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The (x1, x2) -> (-x2, x1) pairing of channels i and i + d/2 that transformers' RoPE uses."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def unrotate(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: the queries (..., n, d) before ``q * cos + rotate_half(q) * sin`` at the positions
    whose ``cos``, ``sin`` (n, d) are given (divided by ``cos^2 + sin^2``, which is not 1 for RoPE
    variants that scale cos and sin)."""
    return (query * cos - rotate_half(query) * sin) / (cos * cos + sin * sin)


def average_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The mean over positions (rows of ``cos``, ``sin``: (n, d)) of RoPE's rotation matrices
    ``R = diag(cos) + diag(sin) P``, ``P x = rotate_half(x)``: a (d, d) matrix (a contraction)."""
    d = cos.shape[-1]
    half = torch.eye(d // 2, dtype=cos.dtype, device=cos.device)
    pairing = torch.zeros(d, d, dtype=cos.dtype, device=cos.device)
    pairing[d // 2:, : d // 2], pairing[: d // 2, d // 2:] = half, -half
    return torch.diag(cos.mean(0)) + sin.mean(0)[:, None] * pairing


def expected_attention_scores(keys, values, mean, cov, scaling, params) -> torch.Tensor:
    """Scores (batch, kv_heads, n) of held keys and values (batch, kv_heads, n, d) given the future
    queries' mean (batch, q_heads, d) and covariance (batch, q_heads, d, d) or None.

    After the ``n_sink`` first tokens: per query head, ``log E[exp(s q.k)] = s mu.k + s^2 k' S k / 2``
    for ``q ~ N(mu, S)`` and the attention scaling ``s``; softmax over the tokens; mean over the query
    heads of a GQA group; times ``||v||`` (after adding ``epsilon``). The sinks get the largest score."""
    sink = params.n_sink
    b, hkv, n, d = keys.shape
    if n <= sink:
        return torch.zeros(b, hkv, n, device=keys.device)
    k = keys[:, :, sink:].float()
    mean = mean.view(b, hkv, -1, d)
    logits = torch.einsum("bhgd,bhnd->bhgn", mean, k) * scaling
    if cov is not None:
        spread = torch.einsum("bhnd,bhgde->bhgne", k, cov.view(b, hkv, -1, d, d))
        logits = logits + (spread * k[:, :, None]).sum(-1) * scaling ** 2 / 2
    scores = logits.softmax(dim=-1).mean(dim=2)
    if params.use_vnorm:
        scores = (scores + params.epsilon) * values[:, :, sink:].float().norm(dim=-1)
    return F.pad(scores, (sink, 0), value=scores.max().item())


def merge_moments(first, second):
    """The (count, mean, centred sum of outer products or None) of two sets of queries from each set's
    own (Chan et al.'s pairwise update: no large sums that cancel)."""
    if first is None:
        return second
    (n1, mean1, m1), (n2, mean2, m2) = first, second
    delta = mean2 - mean1
    mean = mean1 + delta * (n2 / (n1 + n2))
    if m1 is not None:
        m2 = m1 + m2 + delta[..., :, None] * delta[..., None, :] * (n1 * n2 / (n1 + n2))
    return n1 + n2, mean, m2


class ExpectedAttentionLayer(ScoreKeepLayer):
    state_fields = ScoreKeepLayer.state_fields + ("moments", "step_moments", "scaling")

    def __init__(self, method, layer_idx):
        super().__init__(method, layer_idx)
        #: (count, mean (batch, q_heads, d), centred sum of outer products (batch, q_heads, d, d) or
        #: None) of the prompt's queries before RoPE, the sinks' left out; and of the step's, merged
        #: into them at the end of a prefill step
        self.moments = self.step_moments = None
        self.scaling = 1.0

    def observe(self, query, keys, scaling):
        first = self.seen - query.shape[2]  # position of the step's first query
        skip = max(0, self.method.params.n_sink - first)  # the sinks' queries are left out
        self.scaling, self.step_moments = scaling, None
        if skip >= query.shape[2]:
            return
        cos, sin = self.method.rope(self.layer_idx, torch.arange(first + skip, self.seen, device=query.device))
        q = unrotate(query[:, :, skip:].float(), cos, sin)
        mean = q.mean(dim=2)
        centred = q - mean[:, :, None]
        m2 = centred.transpose(-1, -2) @ centred if self.method.params.use_covariance else None
        self.step_moments = (q.shape[2], mean, m2)

    def end_step(self, phase):
        # the statistics are the prompt's (every prefill step: chunks too), not an appended question's
        # or a decoded token's
        if phase == "prefill" and self.step_moments is not None:
            self.moments = merge_moments(self.moments, self.step_moments)
        self.step_moments = None
        super().end_step(phase)

    def score(self):
        """Expected attention of the queries to come (:func:`expected_attention_scores`): the prompt's
        query statistics rotated by RoPE averaged over the next ``n_future_positions`` positions."""
        if self.moments is None:  # a prompt of sinks only: nothing to tell the tokens apart
            return torch.zeros(self.keys.shape[:3], device=self.keys.device)
        count, mean, m2 = self.moments
        future = torch.arange(self.seen, self.seen + self.method.params.n_future_positions, device=self.keys.device)
        rotation = average_rotation(*self.method.rope(self.layer_idx, future))
        cov = rotation @ (m2 / count) @ rotation.T if m2 is not None else None
        return expected_attention_scores(self.keys, self.values, mean @ rotation.T, cov, self.scaling,
                                         self.method.params)


@register
class ExpectedAttention(Method):
    """ExpectedAttention (Devoto et al. 2025, NVIDIA kvpress's ``ExpectedAttentionPress``): keep the
    tokens the queries to come are expected to attend to.

    Queries are modelled as Gaussian. Their mean and covariance per query head are those of the
    prompt's queries before RoPE (every prefill step's, so a chunked prefill gathers them all; not an
    appended question's or a decoded token's), the first ``n_sink`` positions left out (population
    covariance, divided by the count, as kvpress). The future queries' RoPE is replaced by its rotation averaged over the
    positions ``n .. n + n_future_positions - 1`` that follow the ``n``-token prompt, applied to the
    mean and the covariance. A key's score is the softmax over the non-sink tokens of the expected
    logit ``s mu.k + s^2 k' S k / 2`` (``s`` = the attention scaling), averaged over the query heads of
    the KV head's group, times the value's norm; the ``n_sink`` first tokens get the largest score, so
    they are kept. Defaults are kvpress's (512 future positions, 4 sinks, covariance and value norms
    on, epsilon 0). Compresses the prefill, as kvpress; in ratio mode appended and decoded tokens are
    added uncompressed. Budget mode (a hard capacity): after an appended question or a decoding step,
    once the cache holds ``evict_every`` tokens more than the budget, the held tokens are scored again
    with the prompt's statistics and RoPE averaged over the positions after the current one; so it
    holds at most ``budget + evict_every - 1`` tokens.

    How the queries are obtained: kvpress recomputes them from the layer's hidden states with the
    query projection (and Qwen 3's / Gemma 3's query norm); kvbench sees the step's queries after RoPE
    (``observe``) and undoes RoPE with the model's own rotary embedding, which gives the same queries
    (bias included) for any model with transformers' rotate-half RoPE. kvpress writes the scaling as
    ``1 / sqrt(d)``; the layer's own scaling is used here, which is the same except for models that
    scale otherwise (Gemma 3's ``query_pre_attn_scalar``), where it is what their attention uses.
    Ties among the top scores (the sinks share the maximum) go to ``torch.topk``, as in kvpress.
    """

    name = "expected_attention"
    Params = ExpectedAttentionParams
    layer = ExpectedAttentionLayer
    phases = ("prefill",)

    def setup(self, model) -> None:
        super().setup(model)
        self.rotary = getattr(model.get_decoder(), "rotary_emb", None)
        if self.rotary is None:
            raise ConfigError(f"expected_attention needs a model with rotary position embeddings; "
                              f"{type(model).__name__} has none")
        config = getattr(model.config, "text_config", model.config)
        # Gemma 3's rotary embedding takes the layer type (its global and local layers differ)
        types = getattr(config, "layer_types", None) or ["full_attention"] * len(layer_windows(model.config))
        takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.rope_args = [(t,) if takes_type else () for t in types]

    def rope(self, layer_idx: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's ``cos`` and ``sin`` (n, d) at ``positions`` for layer ``layer_idx``, in float32."""
        like = torch.empty(0, device=positions.device)
        cos, sin = self.rotary(like, positions[None], *self.rope_args[layer_idx])
        return cos[0], sin[0]
