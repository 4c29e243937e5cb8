"""SubGen: memory plan, estimator arithmetic, online clustering, convergence with t and s, memory."""

import math

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.methods.subgen import SketchPlan, SubGenParams


def test_plan_spends_the_capacity():
    # capacity 100 token-equivalents = 200 vectors: exact 50 (4 sinks + 46 recent) = 100 vectors;
    # sketch 100 vectors: s = 50 // 2 = 25 value samples (50 vectors), clusters (8 + 1 vectors each) 50 // 9 = 5
    assert SketchPlan.for_capacity(100, SubGenParams()) == SketchPlan(sink=4, recent=46, t=8, s=25, clusters=5)
    # a sketch too small for one full cluster gets a smaller t: capacity 10 -> exact 5, 10 vectors,
    # s = 2 (4 vectors), t = min(8, 6 - 1) = 5, one cluster
    assert SketchPlan.for_capacity(10, SubGenParams()) == SketchPlan(sink=4, recent=1, t=5, s=2, clusters=1)
    # no room for a cluster and a value sample: exact tokens only
    assert SketchPlan.for_capacity(5, SubGenParams()) == SketchPlan(sink=4, recent=1, t=0, s=0, clusters=0)


def make_layer(plan, seed=0, **params):
    layer = build_method("subgen", params, Compression(budget=1), seed).make_layer(0)
    layer.plan = plan
    return layer


def fill(layer, keys, values, chunk=None):
    """Feed ``keys``/``values`` (b, h, n, d): one prefill step, or ``chunk`` tokens per decode step."""
    chunk = chunk or keys.shape[2]
    for i in range(0, keys.shape[2], chunk):
        layer.append(keys[:, :, i:i + chunk], values[:, :, i:i + chunk])
        layer.end_step("prefill" if i == 0 else "decode")
    return layer


def reference_estimate(layer, query, keys, values, scaling):
    """The estimate written out term by term in float64 (query rows see exact keys causally)."""
    b, hq, q_len, d = query.shape
    h = keys.shape[1]
    out = torch.zeros(b, hq, q_len, d, dtype=torch.float64)
    for bi in range(b):
        for head in range(hq):
            kv = head // (hq // h)
            for i in range(q_len):
                q = query[bi, head, i].double()
                visible = keys.shape[2] - q_len + i + 1
                logits = [(scaling * q @ keys[bi, kv, j].double()).item() for j in range(visible)]
                clusters = [(c, [(scaling * q @ x.double()).item() for x in layer.samples[bi, kv, c]])
                            for c in range(layer.counts.shape[-1]) if layer.counts[bi, kv, c] > 0]
                samples = [(scaling * q @ layer.value_keys[bi, kv, j].double()).item() for j in range(layer.plan.s)]
                top = max(logits + [x for _, xs in clusters for x in xs] + samples)
                num = sum(math.exp(l - top) * values[bi, kv, j].double() for j, l in enumerate(logits))
                den = sum(math.exp(l - top) for l in logits)
                for c, xs in clusters:
                    den += layer.counts[bi, kv, c].item() / layer.plan.t * sum(math.exp(x - top) for x in xs)
                mu = layer.mu[bi, kv].item()
                for j, l in enumerate(samples):
                    v = layer.value_values[bi, kv, j].double()
                    num = num + mu / (layer.plan.s * (v @ v).item()) * math.exp(l - top) * v
                out[bi, head, i] = num / den
    return out


@pytest.mark.parametrize("q_len,scale", [(1, 1.0), (3, 1.0), (1, 60.0)])
def test_attend_combines_exact_and_sketched_terms(q_len, scale):
    """GQA (4 query heads on 2 KV heads), causal rows for an appended chunk, and logits in the
    hundreds (scale 60): one shared max keeps every exponential finite."""
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    layer = fill(make_layer(SketchPlan(sink=2, recent=5, t=3, s=4, clusters=4), delta=0.3), keys, values)
    assert layer.get_seq_length() == 7 and (layer.counts > 0).sum(-1).min() >= 2
    chunk_k, chunk_v = torch.randn(1, 2, q_len, 8, generator=g), torch.randn(1, 2, q_len, 8, generator=g)
    held_k, held_v = torch.cat([layer.keys, chunk_k], 2), torch.cat([layer.values, chunk_v], 2)
    query = scale * torch.randn(1, 4, q_len, 8, generator=g)
    out = layer.attend(query, held_k, held_v, 8 ** -0.5, None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference_estimate(layer, query, held_k, held_v, 8 ** -0.5),
                               rtol=1e-4, atol=1e-5)


def clustered_keys(n, d, centres, spread, seed):
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, centres.shape[0], (n,), generator=g)
    return (centres[which] + spread * torch.randn(n, d, generator=g))[None, None], which


def test_online_clustering_of_tight_clusters():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    keys, which = clustered_keys(300, 16, centres, 0.03, seed=1)
    values = torch.randn(1, 1, 300, 16, generator=g)
    layer = fill(make_layer(SketchPlan(sink=0, recent=4, t=4, s=8, clusters=10), delta=0.2), keys, values)
    sketched = keys[0, 0, :296]
    # one cluster per true cluster, opened by its first key in stream order, holding all its keys
    firsts = [int((which[:296] == c).nonzero()[0]) for c in which[:296].unique(sorted=False).tolist()]
    firsts.sort()
    assert torch.equal(layer.centres[0, 0], sketched[firsts])
    assert layer.counts[0, 0].tolist() == [int((which[:296] == which[f]).sum()) for f in firsts]
    # every reservoir sample is a key of its own cluster; every value sample is a sketched (k, v) pair
    for c, f in enumerate(firsts):
        members = sketched[which[:296] == which[f]]
        assert all((members == x).all(-1).any() for x in layer.samples[0, 0, c])
    for k, v in zip(layer.value_keys[0, 0], layer.value_values[0, 0]):
        j = int(((sketched - k).abs().sum(-1) == 0).nonzero()[0])
        assert torch.equal(values[0, 0, j], v)
    assert layer.mu.item() == pytest.approx(values[0, 0, :296].pow(2).sum().item(), rel=1e-5)


def test_bulk_insertion_clusters_like_one_at_a_time():
    """The prompt's keys are clustered in one go; decoding inserts one key per step. Both must give the
    same clusters (including heads that reach the cluster cap and then join the nearest)."""
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 3, 80, 8, generator=g), torch.randn(2, 3, 80, 8, generator=g)
    keys[:, 1] *= 0.05  # a head whose keys are close together: few clusters, far from the cap
    plan = SketchPlan(sink=1, recent=2, t=2, s=3, clusters=12)
    bulk, step = make_layer(plan), make_layer(plan)
    bulk.radius = step.radius = torch.full((2, 3), 0.9)
    fill(bulk, keys, values)  # prefill: tokens 1..76 sketched at once
    fill(step, keys, values, chunk=1)  # one token per step: the same tokens, one at a time
    assert torch.equal(step.counts, bulk.counts)
    assert torch.equal(step.centres, bulk.centres)
    assert (bulk.counts > 0).sum(-1)[:, 0].tolist() == [12, 12]  # capped heads
    assert (bulk.counts > 0).sum(-1)[:, 1].max() < 12


def error_bound(keys, values, query, scaling, recent, centres, t, s):
    """RMS bound on ||estimate - exact attention|| (derivation in the test below)."""
    logits = scaling * keys @ query
    a = (logits - logits.max()).exp()  # any common factor cancels in every ratio below
    sk, ex = slice(0, keys.shape[0] - recent), slice(keys.shape[0] - recent, None)
    exact_out = (a[:, None] * values).sum(0) / a.sum()
    mu = values[sk].pow(2).sum()
    value_term = (mu * a[sk].pow(2).sum() / s).sqrt()
    nearest = torch.cdist(keys[sk], centres).argmin(-1)
    spread_sq, lower = 0.0, a[ex].sum()
    for c in range(centres.shape[0]):
        ac = a[sk][nearest == c]
        spread_sq += len(ac) ** 2 * (ac.max() - ac.min()) ** 2 / (4 * t)
        lower += len(ac) * ac.min()
    return (value_term + exact_out.norm() * math.sqrt(spread_sq)) / lower


def test_estimate_converges_to_exact_attention_as_t_and_s_grow():
    """Keys from 3 tight clusters. With a_i = exp(scaling <q, k_i>), exact tokens E, sketched tokens
    in clusters c (n_c members, a in [L_c, U_c]), the estimate is (N_E + z^)/(D_E + tau^) and
        estimate - exact = ((z^ - z) - exact * (tau^ - tau)) / (D_E + tau^).
    * value samples are i.i.d. l2 draws: E||z^ - z||^2 <= mu sum_sketched a_i^2 / s;
    * cluster slots are i.i.d. uniform draws of a member, a in [L_c, U_c] (Popoviciu):
      Var(tau^_c) <= n_c^2 (U_c - L_c)^2 / (4 t), independent over clusters;
    * every slot is >= L_c, so D_E + tau^ >= D_E + sum_c n_c L_c =: D_low.
    By Minkowski, RMS error <= (sqrt(mu sum a^2 / s) + ||exact|| sqrt(sum_c Var bound)) / D_low,
    which shrinks as 1/sqrt(s) and 1/sqrt(t); the mean error over seeds must stay below it."""
    g = torch.Generator().manual_seed(0)
    d, n, recent = 16, 600, 4
    centres = 3 * torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=-1)
    keys, which = clustered_keys(n, d, centres, 0.03, seed=1)
    values = (torch.randn(3, d, generator=g)[which] + 0.3 * torch.randn(n, d, generator=g))[None, None]
    query = 3 * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    scaling = d ** -0.5
    exact = torch.softmax(scaling * keys[0, 0] @ query, 0) @ values[0, 0]
    errors, bounds = [], []
    for t, s in [(1, 4), (4, 16), (16, 64), (64, 256), (256, 1024)]:
        trial = []
        for seed in range(10):
            layer = fill(make_layer(SketchPlan(sink=0, recent=recent, t=t, s=s, clusters=8), seed, delta=0.2),
                         keys, values)
            assert (layer.counts > 0).sum().item() == 3
            out = layer.attend(query.view(1, 1, 1, d), layer.keys, layer.values, scaling, None)
            trial.append((out[0, 0, 0] - exact).norm().item())
        errors.append(sum(trial) / len(trial))
        bounds.append(error_bound(keys[0, 0], values[0, 0], query, scaling, recent, layer.centres[0, 0], t, s).item())
    assert all(e <= b for e, b in zip(errors, bounds)), (errors, bounds)
    assert bounds == sorted(bounds, reverse=True)
    assert errors[-1] < errors[0] / 5  # 256x the samples: the bound is 16x smaller
    assert errors[-1] / exact.norm() < 0.1


def test_memory_held_is_what_is_stored():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 100, 8, generator=g), torch.randn(1, 2, 100, 8, generator=g)
    plan = SketchPlan(sink=2, recent=6, t=3, s=5, clusters=7)
    layer = fill(make_layer(plan, delta=0.5), keys, values)
    m = layer.counts.shape[-1]  # clusters stored (the largest number over the heads)
    per_head_vectors = 2 * 8 + m * (1 + 3) + 2 * 5  # exact K+V, centres + samples, value K+V
    scalars = m * 4 + 4 + 4  # int32 counts, float32 mu and radius
    assert layer.bytes_held() == 2 * (per_head_vectors * 8 * 4 + scalars)
    used = (layer.counts > 0).sum(-1).float()
    assert layer.tokens_held()[0].tolist() == (8 + (used[0] * 4 + 10) / 2).tolist()


def run(model, comp, prompt, new_tokens, question=None, seed=0, **params):
    cache = KVCache(build_method("subgen", params, comp, seed), layer_windows(model.config))
    return generate(model, cache, prompt, question, new_tokens, eos_ids=set()), cache


def test_generation_stays_within_capacity(tiny_llama):
    # prompt 200, ratio 4 -> capacity 50: exact 25 (4 sinks + 21 recent), sketch 50 vectors:
    # s = 12 value samples, t = 8, (50 - 24) // 9 = 2 clusters -> at most 25 + (2 x 9 + 24) / 2 = 46
    gen, cache = run(tiny_llama, Compression(ratio=4), random_prompt(200), 30, question=random_prompt(5, seed=1))
    layer = cache.layers[0]
    assert layer.plan == SketchPlan(sink=4, recent=21, t=8, s=12, clusters=2)
    head_dim, kv_heads, layers = 16, 2, 2
    token_bytes = 2 * head_dim * 4
    scalars = 2 * 4 + 4 + 4  # counts of 2 clusters, mu, radius
    assert gen.peak_bytes_held <= layers * kv_heads * (50 * token_bytes + scalars)
    assert all(x.get_seq_length() == 25 for x in cache.layers)
    assert max(gen.at_end["tokens_per_layer"]) <= 46
    again, _ = run(tiny_llama, Compression(ratio=4), random_prompt(200), 30, question=random_prompt(5, seed=1))
    assert again.tokens == gen.tokens  # seeded


@pytest.mark.parametrize("budget", [60 + 30, 10_000])
def test_no_eviction_matches_full(tiny_llama, budget):
    """While the sequence fits the capacity it is held exactly (90 = prompt + generated tokens), even
    though the plan would keep only half of it exact once the capacity is exceeded."""
    prompt = random_prompt(60)
    full = generate(tiny_llama, KVCache(build_method("full", {}, None), layer_windows(tiny_llama.config)),
                    prompt, None, 30, eos_ids=set())
    gen, cache = run(tiny_llama, Compression(budget=budget), prompt, 30)
    assert gen.tokens == full.tokens
    assert all(x.mu is None for x in cache.layers)  # nothing was sketched
