"""What each method costs: time, KV bytes and process memory against the full cache, measured in one run.

``scripts/bench_methods.py`` runs :func:`main`; ``docs/performance.md`` explains the columns and keeps
the numbers measured on the reference machine. Every case is one greedy generation of a fixed number
of tokens from a passkey prompt of a given length (EOS ignored, so every method decodes the same
tokens count), through the same ``generate`` the runs use. Cases are interleaved (repeat -> length ->
method), so drift of a shared machine hits every method alike, and summarised by medians.

The sweep measurement times what the runner does for a ratio sweep of a method that shares its
prefill (``Method.shares_prefill``): the first ratio prefills and keeps the state, the others
restore it (``runner.PrefillStore``), against one ratio's run alone.

The chunked-prefill measurement runs every case at the longest length again with the prompt fed in
chunks (``prefill_chunk``), each compressed by the method before the next: the peak KV bytes inside
a step and the peak process memory, with and without chunks.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import torch

from kvbench.cache import KVCache, layer_windows
from kvbench.config import compose_config
from kvbench.generation import Generation, generate
from kvbench.methods import build_method, method_class, registered
from kvbench.methods.base import Compression
from kvbench.models import ModelConfig, load_model, parse_model_config
from kvbench.registry import unknown_name
from kvbench.report import BENCH_PAGE, markdown_table
from kvbench.runner import encode
from kvbench.tasks import build_task

BASELINE = "full"
#: the issue's targets: extra time per sample against the full cache at the longest prompt
TARGETS = {
    "attention-free": (("streaming", "lagkv", "knorm", "random"), 0.05),
    "attention-score": (("h2o", "snapkv", "pyramidkv", "tova", "gkv"), 0.15),
}
#: a sweep over 4 ratios of a prefill-sharing method may cost this much of one ratio's run
SWEEP_TARGET = 1.6


class PeakMemory:
    """Peak memory of the process while the block runs, above what it held when the block began.

    CUDA: the allocator's peak. CPU: the kernel's resident-set high-water mark (``VmHWM``), reset on
    entry through ``/proc/self/clear_refs``; None where that is unavailable (not Linux)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak: int | None = None

    def __enter__(self):
        gc.collect()
        if _libc is not None:
            _libc.malloc_trim(0)  # give freed heap back first, so the peak is this block's own
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.base = _status_bytes("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            self.peak = _status_bytes("VmHWM") - self.base


try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _libc = None


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _generate(model, method_name: str, compression: Compression | None, prompt_ids: torch.Tensor,
              new_tokens: int, params: dict | None = None, **kwargs) -> Generation:
    method = build_method(method_name, params or {}, compression, 0)
    method.setup(model)
    cache = KVCache(method, layer_windows(model.config))
    return generate(model, cache, prompt_ids, None, new_tokens, eos_ids=set(), **kwargs)


def measure(model, method_name: str, ratio: float | None, prompt_ids: torch.Tensor, new_tokens: int,
            params: dict | None = None, prefill_chunk: int | None = None) -> dict:
    """One generation of ``new_tokens`` tokens (the prompt in chunks of ``prefill_chunk`` tokens if
    given): its timings, KV bytes and peak process memory."""
    compression = Compression(ratio=ratio) if ratio is not None else None
    with PeakMemory(prompt_ids.device) as memory:
        gen = _generate(model, method_name, compression, prompt_ids, new_tokens, params, prefill_chunk=prefill_chunk)
    steps = max(1, len(gen.tokens[0]) - 1)  # the first token comes from the prefill's logits
    return {
        "method": method_name,
        "ratio": ratio if ratio is not None else 1.0,
        "prompt_tokens": prompt_ids.shape[1],
        "prefill_s": gen.prefill_s,  # to the first token's logits: forward and compression
        "compress_s": gen.compress_s,
        "decode_ms_per_token": 1000 * gen.decode_s / steps,
        "sample_s": gen.prefill_s + gen.decode_s,
        "measured_ratio": gen.after_prefill["ratio"],
        "kv_bytes_after_prefill": gen.after_prefill["bytes_held"],
        "peak_kv_bytes": gen.peak_bytes_in_step,
        "peak_process_bytes": memory.peak,
    }


def measure_sweep(model, method_name: str, ratios: list[float], prompt_ids: torch.Tensor, new_tokens: int,
                  params: dict | None = None) -> dict:
    """Seconds for one ratio's generation alone and for all ``ratios`` sharing one prefill."""
    t0 = time.perf_counter()
    _generate(model, method_name, Compression(ratio=ratios[0]), prompt_ids, new_tokens, params)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = _generate(model, method_name, Compression(ratio=ratios[0]), prompt_ids, new_tokens, params,
                      keep_prefill=True).prefilled
    for ratio in ratios[1:]:
        _generate(model, method_name, Compression(ratio=ratio), prompt_ids, new_tokens, params, prefilled=state)
    return {"method": method_name, "ratios": len(ratios), "prompt_tokens": prompt_ids.shape[1],
            "one_ratio_s": one, "sweep_s": time.perf_counter() - t0}


def passkey_prompt(tokenizer, model_cfg: ModelConfig, length: int) -> torch.Tensor:
    """Token ids (1, ~length) of a passkey prompt: real text, so attention patterns are realistic."""
    task = build_task({"name": "passkey", "kind": "passkey", "lengths": [length], "depths": [0.5]})
    ids, _ = encode(task.samples(tokenizer, model_cfg)[0], tokenizer, model_cfg, "whole")
    return ids


METRICS = ["prefill_s", "compress_s", "decode_ms_per_token", "sample_s", "kv_bytes_after_prefill",
           "peak_kv_bytes", "peak_process_bytes"]
#: (column, numerator, denominator taken from the full cache at the same length)
VERSUS_FULL = [("sample_vs_full", "sample_s"), ("prefill_vs_full", "prefill_s"),
               ("decode_vs_full", "decode_ms_per_token"), ("peak_kv_vs_full", "peak_kv_bytes"),
               ("peak_process_vs_full", "peak_process_bytes")]


def summarize(raw: pd.DataFrame) -> pd.DataFrame:
    """Medians over repeats per (length, method, ratio), and each against the full cache's median at
    the same length, as a ratio."""
    keys = ["length", "method", "ratio"]
    table = raw.groupby(keys, sort=False).agg(
        prompt_tokens=("prompt_tokens", "first"), repeats=("repeat", "nunique"),
        measured_ratio=("measured_ratio", "median"),
        **{m: (m, "median") for m in METRICS}).reset_index()
    full = table[table.method == BASELINE].set_index("length")
    for column, metric in VERSUS_FULL:
        table[column] = table[metric] / table["length"].map(full[metric])
    return table


def chunk_summary(table: pd.DataFrame, chunk_raw: pd.DataFrame) -> pd.DataFrame:
    """Medians of the chunked-prefill cases next to the same cases' medians with the whole prompt in
    one step (``table``, at the same length)."""
    keys = ["length", "method", "ratio"]
    chunked = chunk_raw.groupby([*keys, "prefill_chunk"], sort=False).agg(
        prompt_tokens=("prompt_tokens", "first"),
        **{f"chunked_{m}": (m, "median") for m in ("prefill_s", "peak_kv_bytes", "peak_process_bytes")}).reset_index()
    one_step = table[[*keys, "prefill_s", "peak_kv_bytes", "peak_process_bytes"]]
    return chunked.merge(one_step, on=keys, how="left")


def sweep_summary(raw: pd.DataFrame) -> pd.DataFrame:
    table = raw.groupby(["method", "ratios"], sort=False).agg(
        prompt_tokens=("prompt_tokens", "first"), repeats=("repeat", "nunique"),
        one_ratio_s=("one_ratio_s", "median"), sweep_s=("sweep_s", "median")).reset_index()
    table["sweep_vs_one"] = table.sweep_s / table.one_ratio_s
    return table


def target_lines(table: pd.DataFrame, sweeps: pd.DataFrame) -> list[str]:
    """The issue's targets, each met or missed, as measured (at the longest length)."""
    longest = table[table.length == table.length.max()]
    lines = []
    for group, (methods, limit) in TARGETS.items():
        for method in methods:
            rows = longest[longest.method == method]
            if rows.empty:
                continue
            worst = rows.sample_vs_full.max()
            verdict = "met" if worst - 1 <= limit else "MISSED"
            lines.append(f"- {group} `{method}`: {100 * (worst - 1):+.1f}% time per sample vs full at "
                         f"{int(rows.prompt_tokens.iloc[0])} tokens, worst ratio (target +{100 * limit:.0f}%): {verdict}")
    for row in sweeps.itertuples():
        verdict = "met" if row.sweep_vs_one <= SWEEP_TARGET else "MISSED"
        lines.append(f"- sweep over {row.ratios} ratios of `{row.method}`: {row.sweep_vs_one:.2f}x one ratio's "
                     f"run (target <= {SWEEP_TARGET}x): {verdict}")
    decode = longest[longest.ratio == 8]
    for row in decode.itertuples():
        verdict = "met" if row.decode_vs_full < 1 else "MISSED"
        lines.append(f"- decode step of `{row.method}` at ratio 8: {row.decode_vs_full:.2f}x full's "
                     f"(target < 1): {verdict}")
    return lines


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None or pd.isna(value) else format(value, spec)


def chunk_markdown(chunks: pd.DataFrame) -> list[str]:
    """The chunked-prefill section of the page: peak KV in a step and peak process memory, one step
    against chunks."""
    mib = 2**20

    def mb(value):
        return _fmt(None if value is None or pd.isna(value) else value / mib, ".1f")

    return ["## Chunked prefill", "The longest prompt again, fed `prefill_chunk` tokens per step, each chunk "
            "compressed before the next. peak KV = most KV bytes held inside a step; peak process = the "
            "process's peak memory during the sample above its level before it.", markdown_table(
                ["prompt tokens", "method", "ratio", "chunk", "prefill s", "chunked prefill s", "peak KV MiB",
                 "chunked peak KV MiB", "peak process MiB", "chunked peak process MiB"],
                [[str(int(r.prompt_tokens)), r.method, f"{r.ratio:g}", str(int(r.prefill_chunk)), f"{r.prefill_s:.2f}",
                  f"{r.chunked_prefill_s:.2f}", mb(r.peak_kv_bytes), mb(r.chunked_peak_kv_bytes),
                  mb(r.peak_process_bytes), mb(r.chunked_peak_process_bytes)] for r in chunks.itertuples()])]


def markdown(table: pd.DataFrame, sweeps: pd.DataFrame, machine: dict, chunks: pd.DataFrame | None = None) -> str:
    header = ["length", "method", "ratio", "measured", "prefill s", "compress s", "decode ms/tok",
              "sample s", "vs full", "decode vs full", "peak KV MiB", "peak KV vs full",
              "peak process MiB", "process vs full"]
    mib = 2**20
    body = [[
        str(int(r.prompt_tokens)), r.method, f"{r.ratio:g}", f"{r.measured_ratio:.2f}x", f"{r.prefill_s:.2f}",
        f"{r.compress_s:.3f}", f"{r.decode_ms_per_token:.1f}", f"{r.sample_s:.2f}", _fmt(r.sample_vs_full, ".2f"),
        _fmt(r.decode_vs_full, ".2f"), f"{r.peak_kv_bytes / mib:.1f}", _fmt(r.peak_kv_vs_full, ".2f"),
        _fmt(r.peak_process_bytes / mib if r.peak_process_bytes is not None else None, ".1f"),
        _fmt(r.peak_process_vs_full, ".2f"),
    ] for r in table.itertuples()]
    parts = [
        "# Method cost",
        "Medians over repeats; \"vs full\" columns divide by the full cache's median at the same length, "
        "measured in the same run. prefill s = time to the first token's logits (forward and compression); "
        "compress s = the part spent in the method's end_step; peak KV = most KV bytes held inside a step; "
        "peak process = the process's peak memory during the sample above its level before it.",
        markdown_table(header, body),
    ]
    if not sweeps.empty:
        parts += ["## One prefill, many ratios", markdown_table(
            ["method", "ratios", "prompt tokens", "one ratio s", "sweep s", "sweep / one"],
            [[r.method, str(r.ratios), str(int(r.prompt_tokens)), f"{r.one_ratio_s:.2f}", f"{r.sweep_s:.2f}",
              f"{r.sweep_vs_one:.2f}"] for r in sweeps.itertuples()])]
    if chunks is not None and not chunks.empty:
        parts += chunk_markdown(chunks)
    parts += ["## Targets", "\n".join(target_lines(table, sweeps)),
              "## Machine", "\n".join(f"- {k}: {v}" for k, v in machine.items())]
    return "\n\n".join(parts) + "\n"


def machine_info(model, args: argparse.Namespace) -> dict:
    device = next(model.parameters()).device
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "model": f"{args.model} ({next(model.parameters()).dtype})",
        "new tokens per sample": args.new_tokens, "repeats": args.repeats, "prefill chunk": args.prefill_chunk,
        "method parameters": " ".join(args.param) if args.param else "the defaults",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _model_config(name: str, device: str | None) -> ModelConfig:
    overrides = [f"model={name}"] + ([f"model.device={device}"] if device else [])
    return parse_model_config(compose_config(overrides)["model"])


def _numbers(text: str, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x]


def _method_config(name: str, overrides: Iterable[str] = ()) -> dict:
    values = compose_config([f"method={name}", *overrides])["method"]
    values.pop("name", None)
    return values


def method_params(settings: list[str], names: Iterable[str] = ()) -> dict[str, dict]:
    """The parameters of every method in ``names`` or in ``settings``, composed as the main CLI
    composes them: ``--param lagkv.lag_size=128`` is ``method=lagkv method.lag_size=128``."""
    overrides: dict[str, list[str]] = {name: [] for name in names}
    for setting in settings:
        name, dot, rest = setting.partition(".")
        key, equals, _ = rest.partition("=")
        if not (dot and key and equals):
            raise SystemExit(f"--param {setting!r}: expected method.key=value, e.g. lagkv.lag_size=128")
        overrides.setdefault(name, []).append(f"method.{rest}")
    params = {}
    for name, extra in overrides.items():
        cls = method_class(name)  # unknown methods fail here, naming the valid ones
        defaults = _method_config(name)
        for override in extra:  # Hydra's own error would not name the valid keys
            key = override.removeprefix("method.").partition("=")[0]
            if key not in defaults:
                raise unknown_name(f"{name} parameter", key, defaults)
        params[name] = _method_config(name, extra) if extra else defaults
        cls.parse_params(params[name])  # the checks the runner makes before loading a model
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_methods.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a model= choice of kvbench (default: %(default)s)")
    parser.add_argument("--device", default=None, help="override the model's device (cpu, cuda)")
    parser.add_argument("--methods", default="all", help="comma-separated registered methods, or 'all'")
    parser.add_argument("--ratios", default="2,8", help="ratios of every compressing method (default: %(default)s)")
    parser.add_argument("--lengths", default="1024,4096", help="prompt lengths in tokens (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sample (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every case (default: %(default)s)")
    parser.add_argument("--sweep-methods", default="streaming,snapkv,lagkv",
                        help="prefill-sharing methods whose ratio sweep is timed ('' for none)")
    parser.add_argument("--sweep-ratios", default="2,4,6,8", help="the sweep's ratios (default: %(default)s)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="also run the longest length with the prompt in chunks of this many tokens "
                             "(0: not; default: %(default)s)")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a method parameter other than its default (repeatable), e.g. lagkv.lag_size=128")
    parser.add_argument("--out", type=Path, default=Path("results") / BENCH_PAGE.parent, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 1:
        parser.error(f"--repeats and --new-tokens must be >= 1, got {args.repeats} and {args.new_tokens}")
    if args.prefill_chunk < 0:
        parser.error(f"--prefill-chunk must be >= 0 (0: no chunked runs), got {args.prefill_chunk}")

    methods = sorted(registered()) if args.methods == "all" else args.methods.split(",")
    methods = [BASELINE] + [m for m in methods if m != BASELINE]
    sweep_methods = [m for m in args.sweep_methods.split(",") if m]
    params = method_params(args.param, methods + sweep_methods)  # unknown methods and parameters fail here
    for name in sweep_methods:
        if not method_class(name).shares_prefill:
            raise SystemExit(f"--sweep-methods: '{name}' does not share its prefill; sharing methods: "
                             f"{sorted(n for n, c in registered().items() if c.shares_prefill)}")
    ratios, lengths = _numbers(args.ratios), _numbers(args.lengths, int)
    cases = [(m, None) if not method_class(m).uses_compression else (m, r) for m in methods for r in ratios]
    cases = list(dict.fromkeys(cases))  # full once

    model_cfg = _model_config(args.model, args.device)
    model, tokenizer = load_model(model_cfg)
    device = next(model.parameters()).device
    prompts = {n: passkey_prompt(tokenizer, model_cfg, n).to(device) for n in lengths}
    measure(model, BASELINE, None, prompts[max(lengths)], args.new_tokens)  # warm-up, not recorded

    args.out.mkdir(parents=True, exist_ok=True)
    raw, sweeps, chunked = [], [], []
    longest = max(lengths)
    for repeat in range(args.repeats):
        for length in lengths:
            for method, ratio in cases:
                row = {"repeat": repeat, "length": length,
                       **measure(model, method, ratio, prompts[length], args.new_tokens, params[method])}
                raw.append(row)
                print(json.dumps(row), flush=True)
        for method, ratio in cases if args.prefill_chunk else []:
            row = {"repeat": repeat, "length": longest, "prefill_chunk": args.prefill_chunk,
                   **measure(model, method, ratio, prompts[longest], args.new_tokens, params[method],
                             prefill_chunk=args.prefill_chunk)}
            chunked.append(row)
            print(json.dumps(row), flush=True)
        for method in sweep_methods:
            row = {"repeat": repeat, **measure_sweep(model, method, _numbers(args.sweep_ratios), prompts[max(lengths)],
                                                      args.new_tokens, params[method])}
            sweeps.append(row)
            print(json.dumps(row), flush=True)
        # written after every repeat, so a stopped benchmark keeps what it measured
        _write(args, model, pd.DataFrame(raw), pd.DataFrame(sweeps), pd.DataFrame(chunked))
    return 0


def _write(args, model, raw: pd.DataFrame, sweep_raw: pd.DataFrame, chunk_raw: pd.DataFrame) -> None:
    table = summarize(raw)
    sweeps = sweep_summary(sweep_raw) if not sweep_raw.empty else pd.DataFrame()
    chunks = chunk_summary(table, chunk_raw) if not chunk_raw.empty else pd.DataFrame()
    raw.to_csv(args.out / "bench_methods_raw.csv", index=False)
    table.to_csv(args.out / "bench_methods.csv", index=False)
    if not sweeps.empty:
        sweep_raw.to_csv(args.out / "bench_sweep_raw.csv", index=False)
        sweeps.to_csv(args.out / "bench_sweep.csv", index=False)
    if not chunks.empty:
        chunk_raw.to_csv(args.out / "bench_chunked_raw.csv", index=False)
        chunks.to_csv(args.out / "bench_chunked.csv", index=False)
    machine = machine_info(model, args)
    (args.out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    (args.out / BENCH_PAGE.name).write_text(markdown(table, sweeps, machine, chunks))
    print(f"wrote {args.out / BENCH_PAGE.name}", flush=True)
