"""Generation owned by kvbench: prefill (whole or in chunks), optional uncompressed append, greedy or
sampled decoding.

Every forward step passes explicit ``position_ids``: positions continue from the original
(uncompressed) sequence length whatever the cache holds, so RoPE sees the true positions. After every
step the cache's layers get ``end_step(phase)``, which is where methods compress. A chunked prefill
(``prefill_chunk=N``) feeds the prompt ``N`` tokens at a time, each chunk a ``prefill`` step that the
method compresses, so no step holds the whole prompt: a method holding ``C`` between steps holds at
most ``C + N`` tokens inside one. With ``N`` at least the prompt's length it is the one-step prefill.
Decoding records the cache held over the generation (``kvbench.results.HeldCurve``).
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field

import torch

from kvbench.cache import KVCache
from kvbench.decoding import Decoding
from kvbench.methods.base import LayerState
from kvbench.results import HeldCurve


@dataclass
class Generation:
    """Output of one batch, with what the cache held and how long each part took."""

    tokens: list[list[int]]
    #: prompt forward(s) and their compression, until the first token's logits
    prefill_s: float
    #: every decoding step: forwards and decode-time compression
    decode_s: float
    #: the parts of ``prefill_s`` and ``decode_s`` spent in the method's ``end_step`` (eviction,
    #: merging, quantisation); scoring done inside attention counts as forward time
    compress_s: float
    decode_compress_s: float
    after_prefill: dict
    at_end: dict
    #: most bytes held between steps (after each step's compression): what the method guarantees
    peak_bytes_held: int
    #: most bytes held inside a step (before its compression: the prompt, or with a chunked prefill
    #: what the previous chunks left plus one chunk, during prefill; +1 token during decoding): the
    #: transient real memory of use-then-compress
    peak_bytes_in_step: int
    #: most tokens any compressed layer's KV head held between steps (the budget's bound)
    peak_tokens_held: int = 0
    #: the cache held during decoding, every ``curve_every`` steps
    curve: HeldCurve | None = None
    stopped_by: list[str] = field(default_factory=list)
    #: the uncompressed prefill state, when asked for (``keep_prefill``) or reused
    prefilled: "Prefilled | None" = None
    #: the cache as decoding started, when asked for (``keep_compressed``)
    compressed: "Compressed | None" = None
    #: mean bytes a decoding step read from the cache (None: no decoding forward step)
    decode_bytes_read: float | None = None


@dataclass
class Prefilled:
    """A cache's state right after the prompt's prefill forward, before the method compressed it.

    For methods whose prefill does not depend on the ratio (``Method.shares_prefill``), one prefill
    serves every ratio of a sweep: restoring this state into a fresh cache and compressing it gives
    exactly what a separate prefill would have given.
    """

    layers: list[LayerState]
    logits: torch.Tensor
    in_step: int
    #: seconds the original prefill forward took
    prefill_s: float

    def nbytes(self) -> int:
        return sum(state.nbytes() for state in self.layers)


@dataclass
class Compressed:
    """A copy of the cache as decoding starts: the prompt prefilled and compressed, and the question
    (if any) appended and compressed, as the method does. A deep copy (the method's instance
    included), so using it leaves the generation's cache alone."""

    cache: KVCache
    #: (batch, vocab) the next-token logits decoding starts from
    logits: torch.Tensor
    #: the sequence's logical length: the position of the next token
    seen: int


def max_tokens_held(cache: KVCache) -> int:
    """The most tokens any KV head of a compressed layer holds (sliding-window layers are bounded by
    their window, not by the method)."""
    held = [layer.tokens_held().max() for layer in cache.layers if not layer.is_sliding]
    return int(torch.stack(held).max()) if held else 0


def choose_tokens(logits: torch.Tensor, decoding: Decoding, generators: list[torch.Generator]) -> torch.Tensor:
    """The next token of every sequence (batch,): the argmax when greedy; otherwise a draw from
    ``softmax(logits / temperature)`` cut to the ``top_k`` most likely tokens, then to the nucleus
    ``top_p`` (ties at the k-th score are kept, as transformers does). Draws use the sequence's CPU
    generator (one per row of ``logits``)."""
    if decoding.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / decoding.temperature
    if decoding.top_k:
        kth = scores.topk(min(decoding.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if decoding.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # a token is dropped once the more likely ones already reach top_p; the most likely never is
        drop = (probs.cumsum(dim=-1) - probs) >= decoding.top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1).cpu()
    drawn = [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)]
    return torch.cat(drawn).to(logits.device)


def _forward(model, cache: KVCache, ids: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
    """Run ``ids`` (batch, q) at logical positions ``start..start+q-1``. Returns the last-token
    logits and the bytes the cache holds before the method compresses (``end_step``)."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    out = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], cache.bytes_held()


def _end_step(cache: KVCache, phase: str) -> float:
    """The method's compression after a forward step; returns the seconds it took."""
    t0 = time.perf_counter()
    cache.end_step(phase)
    return time.perf_counter() - t0


@torch.inference_mode()
def generate(
    model,
    cache: KVCache,
    prompt_ids: torch.Tensor,
    question_ids: torch.Tensor | None,
    max_new_tokens: int,
    eos_ids: set[int],
    stop_check=None,
    min_new_tokens: int = 0,
    prefilled: Prefilled | None = None,
    keep_prefill: bool = False,
    prefill_chunk: int | None = None,
    decoding: Decoding | None = None,
    seeds: list[int] | None = None,
    curve_every: int = 16,
    followup_ids: list[int] | None = None,
    followup_new_tokens: int = 0,
    keep_compressed: bool = False,
) -> Generation:
    """Decoding of ``prompt_ids`` (batch, n) with ``cache``: greedy, or sampled as ``decoding``
    says, each sequence drawing from a generator seeded with its entry of ``seeds``.

    ``prompt_ids`` is prefilled and compressed as the method decides (phase ``prefill``);
    ``question_ids`` (batch, m), if given, is appended afterwards in one step without prefill-time
    compression (phase ``append``: question-agnostic compression, as kvpress does). Stops per sequence
    at an EOS id, when ``stop_check(new_token_ids)`` is true, or after ``max_new_tokens``. EOS ids are
    masked out of the first ``min_new_tokens`` steps (as transformers' ``min_new_tokens`` does).

    With ``followup_ids``, a sequence that stops (for any of these reasons) is not done yet: the
    follow-up tokens are fed to it one by one, as if it had generated them (so decode-time
    compression sees them as it sees generated tokens), and it generates again, up to
    ``followup_new_tokens`` more tokens, with the same stop rules applied to this second part only.
    Its tokens are both parts with the follow-up between them. This asks a question after a long
    generation, as budget forcing appends "Final Answer:" to a cut-off reasoning trace.

    ``prefilled`` replaces the prefill forward by a stored state of the same prompt; with
    ``keep_prefill`` the result carries that state (``Generation.prefilled``) for the next ratio.
    ``prefill_chunk`` feeds the prompt that many tokens per prefill step (None: all at once); a
    prefill of several chunks depends on the compression between them, so it is never stored or reused.
    With ``keep_compressed`` the result carries a copy of the cache as decoding starts
    (``Generation.compressed``), taken outside the timed parts.

    The cache held is recorded after prefill, after every ``curve_every``-th decoding step and at the
    end (``Generation.curve``); its peak is tracked at every step.
    """
    batch, seen = prompt_ids.shape
    chunk = seen if prefill_chunk is None else prefill_chunk
    if chunk < seen and (prefilled is not None or keep_prefill):
        raise ValueError(f"a prefill in chunks of {chunk} tokens ({seen}-token prompt) depends on the compression "
                         "between its chunks: it cannot be stored or reused")
    decoding = decoding or Decoding()
    if not decoding.greedy and (seeds is None or len(seeds) != batch):
        raise ValueError(f"sampling needs one seed per sequence: {batch} sequences, seeds {seeds}")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds] if not decoding.greedy else []
    cache.begin(seen)
    with cache.active():
        t0 = time.perf_counter()
        between_chunks = []  # bytes held after each chunk but the last
        if prefilled is not None:
            for layer, state in zip(cache.layers, prefilled.layers):
                layer.restore(state)
            logits, in_step = prefilled.logits, prefilled.in_step
            compress_s = _end_step(cache, "prefill")
        else:
            in_step, compress_s = 0, 0.0
            for start in range(0, seen, chunk):
                if start:
                    between_chunks.append(cache.bytes_held())
                logits, chunk_bytes = _forward(model, cache, prompt_ids[:, start:start + chunk], start)
                in_step = max(in_step, chunk_bytes)
                if keep_prefill:  # one chunk (checked above)
                    forward_s = time.perf_counter() - t0
                    prefilled = Prefilled([layer.snapshot() for layer in cache.layers], logits, in_step, forward_s)
                    t0 = time.perf_counter() - forward_s  # the snapshot's copy is not prefill time
                compress_s += _end_step(cache, "prefill")
        if question_ids is not None and question_ids.shape[1] > 0:
            logits, appended = _forward(model, cache, question_ids, seen)
            compress_s += _end_step(cache, "append")
            in_step = max(in_step, appended)
            seen += question_ids.shape[1]
        prefill_s = time.perf_counter() - t0
        compressed = Compressed(copy.deepcopy(cache), logits, seen) if keep_compressed else None
        after_prefill = cache.stats()
        peak = max([after_prefill["bytes_held"], *between_chunks])
        peak_tokens = max_tokens_held(cache)
        curve = HeldCurve(curve_every)
        curve.add(0, peak_tokens, peak)
        fed = 0  # generated tokens fed back through the model

        out: list[list[int]] = [[] for _ in range(batch)]
        stopped_by = [""] * batch
        # per sequence: where the part being generated starts in ``out`` and the length it may reach,
        # whether the follow-up is still to come and its tokens still to feed
        start, limit = [0] * batch, [max_new_tokens] * batch
        pending, forced = [bool(followup_ids)] * batch, [[] for _ in range(batch)]
        decode_compress_s = 0.0
        read, steps = 0, 0
        t0 = time.perf_counter()
        banned = torch.tensor(sorted(eos_ids), dtype=torch.long, device=logits.device)
        for step in itertools.count():
            if step < min_new_tokens and len(banned):
                logits = logits.index_fill(-1, banned, float("-inf"))
            next_ids = choose_tokens(logits, decoding, generators)
            for b in range(batch):
                if stopped_by[b]:
                    continue
                if forced[b]:
                    next_ids[b] = forced[b].pop(0)
                    out[b].append(int(next_ids[b]))
                    continue
                token = int(next_ids[b])
                out[b].append(token)
                if token in eos_ids:
                    stopped_by[b] = "eos"
                elif stop_check is not None and stop_check(out[b][start[b]:]):
                    stopped_by[b] = "stop"
                elif len(out[b]) >= limit[b]:
                    stopped_by[b] = "max_new_tokens"
                if stopped_by[b] and pending[b]:
                    pending[b], stopped_by[b], forced[b] = False, "", list(followup_ids)
                    start[b] = len(out[b]) + len(followup_ids)
                    limit[b] = start[b] + followup_new_tokens
            if all(stopped_by):
                break
            logits, step_bytes = _forward(model, cache, next_ids[:, None], seen)
            read, steps = read + cache.bytes_read(), steps + 1
            decode_compress_s += _end_step(cache, "decode")
            in_step = max(in_step, step_bytes)
            seen += 1
            fed += 1
            held, tokens = cache.bytes_held(), max_tokens_held(cache)
            peak, peak_tokens = max(peak, held), max(peak_tokens, tokens)
            if fed % curve_every == 0:
                curve.add(fed, tokens, held)
        decode_s = time.perf_counter() - t0
        if curve.steps[-1] != fed:
            curve.add(fed, max_tokens_held(cache), cache.bytes_held())
    return Generation(
        tokens=out,
        prefill_s=prefill_s,
        decode_s=decode_s,
        compress_s=compress_s,
        decode_compress_s=decode_compress_s,
        after_prefill=after_prefill,
        at_end=cache.stats(),
        peak_bytes_held=peak,
        peak_bytes_in_step=in_step,
        peak_tokens_held=peak_tokens,
        curve=curve,
        stopped_by=stopped_by,
        prefilled=prefilled,
        compressed=compressed,
        decode_bytes_read=read / steps if steps else None,
    )
