"""Kept positions of kvbench's methods against NVIDIA kvpress's presses, on the same prompt and weights.

    .venv/bin/python scripts/compare_kvpress.py                    # every method, ratios 2 and 4
    .venv/bin/python scripts/compare_kvpress.py --ratios 4 --methods snapkv,knorm
    .venv/bin/python scripts/compare_kvpress.py --help

Both sides load the embedded SmolLM2-135M GGUF in float32, prefill the same ``--tokens`` prompt token
ids (the start of ``--text``, tokenized by the model's tokenizer) and compress it once. For every method
and ratio, the prompt positions each layer and KV head keeps are compared by their Jaccard index
``|A & B| / |A | B|``; the table gives its mean and minimum over layers and heads, and the count bound
(the mean of ``min(|A|, |B|) / max(|A|, |B|)``, the highest Jaccard sets of those sizes can reach), which
tells a difference in how many tokens are kept from one in which tokens.

kvpress pins an older transformers than kvbench, so it runs in its own virtual environment
(``--venv``, default ``.venv-kvpress``, git-ignored), which this script creates on first use with pip:
torch first (``TORCH_SPEC``, default ``torch==2.13.0``, as ``scripts/install.sh``, so pip never pulls a
CUDA build), then ``kvpress`` and ``transformers`` at the pinned versions below, and ``gguf``. The same
file is run there as the kvpress side (``--side kvpress``): it imports neither kvbench nor anything
outside that environment, reads the token ids and writes the kept positions as JSON.

kvpress's kept positions are read where its presses act: the hook calls the press's ``compress``, which
returns the kept keys gathered from the layer's keys, so each kept key row is matched (bit for bit) to
its position; a head-wise press (AdaKV) returns the keys whole and records the masked ones in
``module.masked_key_indices``, whose complement is kept. kvbench's are its layers' ``positions`` after
the prefill's compression. Not part of CI (no test runs kvpress); results and their explanations:
docs/fidelity.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KVPRESS_VERSION = "0.5.5"
#: the newest transformers kvpress 0.5.5 admits (<5.3) when this was written; pinned for repeatability
KVPRESS_TRANSFORMERS = "5.2.0"

#: per method: kvbench's parameters, and kvpress's press as {"press": class name, **its arguments}
#: (``inner``: the scorer a wrapper press wraps). Where the two defaults differ the value is set
#: explicitly so both sides run the same parameters.
METHODS = {
    # kvbench's default window is 32 (FasterDecoding/SnapKV), kvpress's 64: both run 64
    "snapkv": ({"window": 64}, {"press": "SnapKVPress", "window_size": 64, "kernel_size": 5}),
    "streaming": ({"sink_tokens": 4}, {"press": "StreamingLLMPress", "n_sink": 4}),
    "knorm": ({}, {"press": "KnormPress"}),
    "tova": ({}, {"press": "TOVAPress"}),
    "pyramidkv": ({"window": 64, "kernel": 5, "beta": 20},
                  {"press": "PyramidKVPress", "window_size": 64, "kernel_size": 5, "beta": 20}),
    "lagkv_kvpress": ({"sink_tokens": 4, "lag_size": 128}, {"press": "LagKVPress", "n_sink": 4, "lag_size": 128}),
    "expected_attention": ({}, {"press": "ExpectedAttentionPress", "n_future_positions": 512, "n_sink": 4}),
    "keydiff": ({}, {"press": "KeyDiffPress"}),
    # kvbench's base scores with its own defaults (SnapKV's window 32): kvpress's SnapKVPress is given 32
    "chunkkv": ({"base": "snapkv", "chunk_length": 20},
                {"press": "ChunkKVPress", "chunk_length": 20, "inner": {"press": "SnapKVPress", "window_size": 32}}),
    # head-wise budgets; kvbench's base scores with its own defaults (SnapKV's window 32), as for chunkkv
    "adakv": ({"base": "snapkv", "alpha_safeguard": 0.2},
              {"press": "AdaKVPress", "alpha_safeguard": 0.2, "inner": {"press": "SnapKVPress", "window_size": 32}}),
}


# -- comparison (pure) ----------------------------------------------------------------------------------

def jaccard(a, b) -> float:
    """|A & B| / |A | B| of two collections of positions (1.0 when both are empty)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a or b else 1.0


def compare_kept(ours, theirs) -> dict:
    """Agreement of two sets of kept positions, each ``[layer][kv_head] -> positions``.

    Returns the Jaccard index per layer and head (``jaccard``), its mean and minimum with the first
    (layer, head) reaching it, the mean count bound ``min(|A|, |B|) / max(|A|, |B|)`` (what the Jaccard
    could reach given only how many positions each side keeps) and the mean kept per head of each side."""
    if len(ours) != len(theirs) or any(len(x) != len(y) for x, y in zip(ours, theirs)):
        raise ValueError(f"layer/head shapes differ: {[len(x) for x in ours]} vs {[len(y) for y in theirs]}")
    per = [[jaccard(a, b) for a, b in zip(x, y)] for x, y in zip(ours, theirs)]
    flat = [(j, (layer, head)) for layer, row in enumerate(per) for head, j in enumerate(row)]
    if not flat:
        raise ValueError("no layers to compare")
    bounds = [min(len(a), len(b)) / max(len(a), len(b)) if a or b else 1.0
              for x, y in zip(ours, theirs) for a, b in zip(x, y)]
    worst = min(flat, key=lambda item: item[0])
    return {
        "jaccard": per,
        "mean": sum(j for j, _ in flat) / len(flat),
        "min": worst[0],
        "min_at": list(worst[1]),
        "count_bound": sum(bounds) / len(bounds),
        "kept_ours": sum(len(a) for x in ours for a in x) / len(flat),
        "kept_theirs": sum(len(b) for y in theirs for b in y) / len(flat),
    }


def table(rows: list[dict]) -> str:
    """The markdown table of :func:`compare_kept` results (rows: method, ratio and the result)."""
    lines = ["| method | ratio | mean Jaccard | min Jaccard (layer, head) | count bound | kept kvbench | kept kvpress |",
             "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| `{r['method']}` | {r['ratio']:g} | skipped: {r['skipped']} | | | | |")
            continue
        c = r["result"]
        lines.append(f"| `{r['method']}` | {r['ratio']:g} | {c['mean']:.4f} | {c['min']:.4f} ({c['min_at'][0]}, "
                     f"{c['min_at'][1]}) | {c['count_bound']:.4f} | {c['kept_ours']:.1f} | {c['kept_theirs']:.1f} |")
    return "\n".join(lines)


# -- kvpress side (runs in the kvpress environment: no kvbench import) ----------------------------------

def build_press(spec: dict, compression_ratio: float):
    import kvpress

    spec = dict(spec)
    cls = getattr(kvpress, spec.pop("press"))
    inner = spec.pop("inner", None)
    if inner is not None:
        return cls(press=build_press(inner, compression_ratio), **spec)
    return cls(compression_ratio=compression_ratio, **spec)


def kept_positions(keys, kept_keys, masked) -> list[list[int]]:
    """Per KV head, the positions of ``keys`` (1, heads, n, d) that a press kept: the complement of
    ``masked`` (head-wise presses) or else the rows of ``kept_keys`` matched bit for bit to ``keys``."""
    heads, n = keys.shape[1], keys.shape[2]
    if masked is not None:
        _, head_idx, seq_idx = masked
        gone = [set() for _ in range(heads)]
        for h, s in zip(head_idx.tolist(), seq_idx.tolist()):
            gone[h].add(s)
        return [[p for p in range(n) if p not in gone[h]] for h in range(heads)]
    out = []
    for h in range(heads):
        rows = keys[0, h].float().cpu().numpy()
        where = {row.tobytes(): i for i, row in enumerate(rows)}
        if len(where) != n:
            raise RuntimeError(f"two positions of head {h} hold identical keys: kept positions are ambiguous")
        out.append(sorted(where[row.tobytes()] for row in kept_keys[0, h].float().cpu().numpy()))
    return out


def kvpress_side(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    ids = torch.tensor([json.loads(Path(args.ids).read_text())])
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=args.gguf_file, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    out = {}
    for name in args.methods.split(","):
        for ratio in args.ratios:
            press = build_press(METHODS[name][1], 1 - 1 / ratio)
            kept: dict[int, list[list[int]]] = {}
            compress = press.compress

            def capture(module, hidden_states, keys, values, attentions, kwargs, compress=compress, kept=kept):
                module.masked_key_indices = None  # not an earlier head-wise press's
                new_keys, new_values = compress(module, hidden_states, keys, values, attentions, kwargs)
                kept[module.layer_idx] = kept_positions(keys, new_keys, getattr(module, "masked_key_indices", None))
                return new_keys, new_values

            press.compress = capture
            with torch.inference_mode(), press(model):
                model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            out[f"{name}@{ratio:g}"] = [kept[i] for i in sorted(kept)]
            print(f"kvpress {name} ratio {ratio:g}: done", flush=True)
    Path(args.kept).write_text(json.dumps(out))


# -- kvbench side (the main environment) -------------------------------------------------------------------

def kvbench_side(model, ids, methods: list[str], ratios: list[float]) -> dict:
    """``{"name@ratio": [layer][head] -> kept prompt positions}`` after kvbench's prefill compression."""
    from kvbench.cache import KVCache
    from kvbench.generation import generate
    from kvbench.methods import build_method
    from kvbench.methods.base import Compression, layer_windows

    out = {}
    for name in methods:
        for ratio in ratios:
            method = build_method(name, METHODS[name][0], Compression(ratio=ratio))
            method.setup(model)
            cache = KVCache(method, layer_windows(model.config))
            compressed = generate(model, cache, ids, None, 1, eos_ids=set(), keep_compressed=True).compressed.cache
            # heads holding different numbers of tokens (AdaKV) are padded with position -1
            out[f"{name}@{ratio:g}"] = [[sorted(p for p in head.tolist() if p >= 0) for head in layer.positions[0]]
                                        for layer in compressed.layers]
            print(f"kvbench {name} ratio {ratio:g}: done", flush=True)
    return out


def ensure_venv(venv: Path) -> Path:
    """The kvpress environment's python, creating the environment first if it has no kvpress."""
    python = venv / "bin" / "python"
    has_kvpress = f"import importlib.metadata as m; assert m.version('kvpress') == '{KVPRESS_VERSION}'"
    if python.exists() and subprocess.run([str(python), "-c", has_kvpress], check=False,
                                          capture_output=True).returncode == 0:
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    # torch first and pinned, as scripts/install.sh: a bare requirement can pull a multi-GB CUDA build
    subprocess.run(pip + [os.environ.get("TORCH_SPEC", "torch==2.13.0")], check=True)
    subprocess.run(pip + [f"kvpress=={KVPRESS_VERSION}", f"transformers=={KVPRESS_TRANSFORMERS}", "gguf"], check=True)
    return python


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0],
                   help="kvbench ratios; kvpress gets compression_ratio = 1 - 1/ratio")
    p.add_argument("--tokens", type=int, default=1500, help="prompt length in tokens")
    p.add_argument("--text", default=str(ROOT / "docs" / "architecture.md"), help="text whose start is the prompt")
    p.add_argument("--venv", default=str(ROOT / ".venv-kvpress"), help="kvpress's virtual environment")
    p.add_argument("--out", default=str(ROOT / "results" / "kvpress"), help="folder for ids, kept positions, table")
    p.add_argument("--side", choices=("kvpress",), help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--gguf-file", help=argparse.SUPPRESS)
    p.add_argument("--kept", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # quiet progress bars and load reports, in this process and the kvpress one (which inherits them)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    if args.side == "kvpress":
        kvpress_side(args)
        return 0

    import yaml

    from kvbench.methods import registered
    from kvbench.models import _locate, load_model, parse_model_config

    skipped = [m for m in methods if m not in registered()]
    for m in skipped:
        print(f"{m}: skipped, kvbench has no method '{m}' in this checkout", flush=True)
    methods = [m for m in methods if m not in skipped]
    if not methods:
        return 1
    cfg = parse_model_config(yaml.safe_load((ROOT / "kvbench/conf/model/smollm2-135m.yaml").read_text()))
    cfg.device = "cpu"
    model, tokenizer = load_model(cfg)
    ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        p.error(f"{args.text} has only {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompt_ids.json").write_text(json.dumps(ids[0].tolist()))

    ours = kvbench_side(model, ids, methods, args.ratios)
    (out / "kept_kvbench.json").write_text(json.dumps(ours))
    where, extra = _locate(cfg)
    python = ensure_venv(Path(args.venv))
    subprocess.run([str(python), __file__, "--side", "kvpress", "--methods", ",".join(methods), "--ratios",
                    *map(str, args.ratios), "--ids", str(out / "prompt_ids.json"), "--model-dir", where,
                    "--gguf-file", extra["gguf_file"], "--kept", str(out / "kept_kvpress.json")], check=True)
    theirs = json.loads((out / "kept_kvpress.json").read_text())

    rows = []
    for name in [*methods, *skipped]:
        for ratio in args.ratios:
            if name in skipped:
                rows.append({"method": name, "ratio": ratio, "skipped": "not in kvbench's registry"})
                continue
            key = f"{name}@{ratio:g}"
            rows.append({"method": name, "ratio": ratio, "result": compare_kept(ours[key], theirs[key])})
    (out / "comparison.json").write_text(json.dumps(rows))
    digest = hashlib.sha256((out / "prompt_ids.json").read_bytes()).hexdigest()[:12]
    print(f"\nprompt: the first {args.tokens} tokens of {args.text} (ids sha256 {digest}); kvpress {KVPRESS_VERSION}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
