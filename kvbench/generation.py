"""Generation owned by kvbench: prefill, optional uncompressed append, greedy decoding.

Every forward step passes explicit ``position_ids``: positions continue from the original
(uncompressed) sequence length whatever the cache holds, so RoPE sees the true positions. After every
step the cache's layers get ``end_step(phase)``, which is where methods compress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvbench.cache import KVCache
from kvbench.methods.base import LayerState


@dataclass
class Generation:
    """Greedy output of one batch, with what the cache held and how long each part took."""

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
    #: most bytes held inside a step (before its compression: the prompt during prefill, +1 token
    #: during decoding): the transient real memory of use-then-compress
    peak_bytes_in_step: int
    stopped_by: list[str] = field(default_factory=list)
    #: the uncompressed prefill state, when asked for (``keep_prefill``) or reused
    prefilled: "Prefilled | None" = None
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
) -> Generation:
    """Greedy decoding of ``prompt_ids`` (batch, n) with ``cache``.

    ``prompt_ids`` is prefilled and compressed as the method decides (phase ``prefill``);
    ``question_ids`` (batch, m), if given, is appended afterwards in one step without prefill-time
    compression (phase ``append``: question-agnostic compression, as kvpress does). Stops per sequence
    at an EOS id, when ``stop_check(new_token_ids)`` is true, or after ``max_new_tokens``. EOS ids are
    masked out of the first ``min_new_tokens`` steps (as transformers' ``min_new_tokens`` does).

    ``prefilled`` replaces the prefill forward by a stored state of the same prompt; with
    ``keep_prefill`` the result carries that state (``Generation.prefilled``) for the next ratio.
    """
    batch = prompt_ids.shape[0]
    with cache.active():
        t0 = time.perf_counter()
        if prefilled is not None:
            for layer, state in zip(cache.layers, prefilled.layers):
                layer.restore(state)
            logits, in_step = prefilled.logits, prefilled.in_step
        else:
            logits, in_step = _forward(model, cache, prompt_ids, 0)
            if keep_prefill:
                forward_s = time.perf_counter() - t0
                prefilled = Prefilled([layer.snapshot() for layer in cache.layers], logits, in_step, forward_s)
                t0 = time.perf_counter() - forward_s  # the snapshot's copy is not prefill time
        compress_s = _end_step(cache, "prefill")
        seen = prompt_ids.shape[1]
        if question_ids is not None and question_ids.shape[1] > 0:
            logits, appended = _forward(model, cache, question_ids, seen)
            compress_s += _end_step(cache, "append")
            in_step = max(in_step, appended)
            seen += question_ids.shape[1]
        prefill_s = time.perf_counter() - t0
        after_prefill = cache.stats()
        peak = after_prefill["bytes_held"]

        out: list[list[int]] = [[] for _ in range(batch)]
        stopped_by = [""] * batch
        decode_compress_s = 0.0
        read, steps = 0, 0
        t0 = time.perf_counter()
        banned = torch.tensor(sorted(eos_ids), dtype=torch.long, device=logits.device)
        for step in range(max_new_tokens):
            if step < min_new_tokens and len(banned):
                logits = logits.index_fill(-1, banned, float("-inf"))
            next_ids = logits.argmax(dim=-1)
            for b in range(batch):
                if stopped_by[b]:
                    continue
                token = int(next_ids[b])
                out[b].append(token)
                if token in eos_ids:
                    stopped_by[b] = "eos"
                elif stop_check is not None and stop_check(out[b]):
                    stopped_by[b] = "stop"
            if all(stopped_by) or step == max_new_tokens - 1:
                break
            logits, step_bytes = _forward(model, cache, next_ids[:, None], seen)
            read, steps = read + cache.bytes_read(), steps + 1
            decode_compress_s += _end_step(cache, "decode")
            in_step = max(in_step, step_bytes)
            seen += 1
            peak = max(peak, cache.bytes_held())
        decode_s = time.perf_counter() - t0
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
        stopped_by=[s or "max_new_tokens" for s in stopped_by],
        prefilled=prefilled,
        decode_bytes_read=read / steps if steps else None,
    )
