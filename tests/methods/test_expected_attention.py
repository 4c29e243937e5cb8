"""ExpectedAttention: the RoPE algebra, the score on hand-made statistics, and the query statistics
recovered from a real model's queries (before RoPE, Gemma 3's query norm included)."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.methods.expected_attention import (ExpectedAttention, average_rotation, expected_attention_scores,
                                                merge_moments, unrotate)


def test_average_rotation_by_hand():
    # d = 2, two future positions at angles 0 and 90 degrees: the mean of [[1, 0], [0, 1]] and
    # [[0, -1], [1, 0]]
    cos = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    sin = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    rotation = average_rotation(cos, sin)
    torch.testing.assert_close(rotation, torch.tensor([[0.5, -0.5], [0.5, 0.5]]))
    torch.testing.assert_close(torch.tensor([1.0, 0.0]) @ rotation.T, torch.tensor([0.5, 0.5]))


def test_unrotate_inverts_transformers_rope_even_with_scaled_cos_and_sin():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 2, 5, 4, generator=g)
    angles = torch.randn(5, 2, generator=g)
    for scale in (1.0, 1.3):  # RoPE variants that scale cos and sin (YaRN's attention factor)
        cos, sin = (torch.cat([f(angles), f(angles)], dim=-1) * scale for f in (torch.cos, torch.sin))
        rotated, _ = apply_rotary_pos_emb(query, query, cos[None], sin[None])
        torch.testing.assert_close(unrotate(rotated, cos, sin), query)


def test_expected_attention_scores_by_hand():
    # one KV head, two query heads; token 0 is a sink; keys [1, 0], [0, 1], [0, 0] after it.
    # Head 0: mean (ln 2, 0), covariance diag(0, 2 ln 3), scaling 1: expected logits ln 2, ln 3, 0,
    # softmax 2/6, 3/6, 1/6. Head 1: mean 0, covariance 0: 1/3 each. Mean over the heads:
    # 1/3, 5/12, 1/4; times the value norms 1, 2, 6: 1/3, 5/6, 3/2; the sink gets the largest, 3/2.
    keys = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])[None, None]
    values = torch.tensor([[5.0, 0.0], [1.0, 0.0], [0.0, 2.0], [6.0, 0.0]])[None, None]
    mean = torch.tensor([[math.log(2), 0.0], [0.0, 0.0]])[None]
    cov = torch.zeros(1, 2, 2, 2)
    cov[0, 0, 1, 1] = 2 * math.log(3)
    params = ExpectedAttention.Params(n_sink=1)
    scores = expected_attention_scores(keys, values, mean, cov, 1.0, params)
    torch.testing.assert_close(scores[0, 0], torch.tensor([3 / 2, 1 / 3, 5 / 6, 3 / 2]))
    # without the covariance head 0 gives 2/4, 1/4, 1/4; without value norms the probabilities stay
    plain = expected_attention_scores(keys, values, mean, None, 1.0,
                                      ExpectedAttention.Params(n_sink=1, use_vnorm=False))
    torch.testing.assert_close(plain[0, 0], torch.tensor([5 / 12, 5 / 12, 7 / 24, 7 / 24]))
    # epsilon is added before the value norms: (p + 0.1) * ||v||
    eps = expected_attention_scores(keys, values, mean, cov, 1.0, ExpectedAttention.Params(n_sink=1, epsilon=0.1))
    torch.testing.assert_close(eps[0, 0, 1:], torch.tensor([1 / 3 + 0.1, 5 / 6 + 0.2, 3 / 2 + 0.6]))


def test_merged_moments_equal_those_of_all_queries():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 11, 4, generator=g) + 5.0  # a large mean: a naive sum of squares would cancel

    def moments(part):
        centred = part - part.mean(dim=2, keepdim=True)
        return part.shape[2], part.mean(dim=2), centred.transpose(-1, -2) @ centred

    count, mean, m2 = merge_moments(merge_moments(None, moments(q[:, :, :4])), moments(q[:, :, 4:]))
    whole = moments(q)
    assert count == 11
    torch.testing.assert_close(mean, whole[1])
    torch.testing.assert_close(m2, whole[2])


def prerope_queries(model, fixture, prompt):
    """The last layer's queries before RoPE (batch, heads, n, d), as the model computes them."""
    attention = model.model.layers[-1].self_attn
    got = []
    module = attention.q_norm if fixture == "tiny_gemma" else attention.q_proj
    hook = module.register_forward_hook(lambda m, i, out: got.append(out))
    try:
        cache = make_cache(model, ratio=4)
        generate(model, cache, prompt, None, 3, eos_ids=set())
    finally:
        hook.remove()
    first = got[0]
    if fixture == "tiny_llama":  # q_proj's output (batch, n, heads * d)
        first = first.view(*prompt.shape, -1, attention.head_dim).transpose(1, 2)
    return first, cache


def make_cache(model, **comp):
    method = build_method("expected_attention", {}, Compression(**comp))
    method.setup(model)
    return KVCache(method, layer_windows(model.config))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_statistics_are_those_of_the_prompt_queries_before_rope(fixture, request):
    model = request.getfixturevalue(fixture)
    prompt = random_prompt(60, batch=2)
    queries, cache = prerope_queries(model, fixture, prompt)
    layer = cache.layers[-1]
    q = queries[:, :, 4:].float()  # the 4 sinks' queries are left out
    count, mean, m2 = layer.moments
    assert count == 56
    torch.testing.assert_close(mean, q.mean(dim=2), atol=1e-5, rtol=1e-4)
    centred = q - q.mean(dim=2, keepdim=True)
    torch.testing.assert_close(m2 / count, centred.transpose(-1, -2) @ centred / 56, atol=1e-5, rtol=1e-4)
    # the three decoding steps (one query each) left the prompt's statistics alone, and the prompt
    # was cut to a quarter, the 4 sinks kept
    assert layer.get_seq_length() == 15 + 2 and (layer.positions[..., :4] == torch.arange(4)).all()


def test_scores_equal_kvpress_formula_from_hidden_states(tiny_llama):
    """kvpress's way: query statistics from the attention's input hidden states (after the sinks)
    through the query projection, RoPE rotations averaged over the 512 positions after the prompt,
    scores from the expected logits, group mean, value norms, sinks at the maximum."""
    attention = tiny_llama.model.layers[0].self_attn
    hidden = []
    hook = attention.q_proj.register_forward_hook(lambda m, args, out: hidden.append(args[0]))
    try:
        cache = make_cache(tiny_llama, budget=1000)  # nothing evicted: score the whole prompt
        generate(tiny_llama, cache, random_prompt(80), None, 1, eos_ids=set())
    finally:
        hook.remove()
    layer = cache.layers[0]
    b, n, d, heads = 1, 80, attention.head_dim, tiny_llama.config.num_attention_heads
    h = hidden[0][:, 4:].float()
    weight = attention.q_proj.weight.float()
    mean_h = h.mean(dim=1, keepdim=True)
    mu = (mean_h @ weight.T).view(b, heads, d)
    cov_h = (h - mean_h).transpose(1, 2) @ (h - mean_h) / h.shape[1]
    cov = (weight @ cov_h @ weight.T).view(b, heads, d, heads, d).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    cos, sin = tiny_llama.model.rotary_emb(mu, torch.arange(n, n + 512)[None])
    pairing = torch.zeros(d, d)
    pairing[d // 2:, : d // 2], pairing[: d // 2, d // 2:] = torch.eye(d // 2), -torch.eye(d // 2)
    rotation = (cos[0][:, :, None] * torch.eye(d) + sin[0][:, :, None] * pairing).mean(0)
    mu, cov = mu @ rotation.T, rotation @ cov @ rotation.T
    keys = layer.keys[:, :, 4:].repeat_interleave(heads // layer.keys.shape[1], dim=1).transpose(2, 3)
    logits = (mu[:, :, None] @ keys)[:, :, 0] / math.sqrt(d)
    logits = logits + torch.einsum("bhin,bhij,bhjn->bhn", keys, cov, keys) / d / 2
    scores = logits.softmax(-1).view(b, layer.keys.shape[1], -1, n - 4).mean(2) * layer.values[:, :, 4:].norm(dim=-1)
    expected = torch.nn.functional.pad(scores, (4, 0), value=scores.max().item())
    torch.testing.assert_close(layer.score(), expected, atol=1e-6, rtol=1e-4)


def test_a_chunked_prefill_gathers_the_statistics_of_every_chunk(tiny_llama):
    prompt = random_prompt(60)
    queries, cache = prerope_queries(tiny_llama, "tiny_llama", prompt)
    chunked = make_cache(tiny_llama, budget=100)  # nothing evicted: the chunks see what the whole prompt sees
    generate(tiny_llama, chunked, prompt, None, 2, eos_ids=set(), prefill_chunk=16)
    count, mean, m2 = chunked.layers[-1].moments
    q = queries[:, :, 4:].float()
    assert count == 56
    torch.testing.assert_close(mean, q.mean(dim=2), atol=1e-5, rtol=1e-4)
    centred = q - q.mean(dim=2, keepdim=True)
    torch.testing.assert_close(m2, centred.transpose(-1, -2) @ centred, atol=1e-4, rtol=1e-4)
