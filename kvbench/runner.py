"""Running one configuration: validate -> model -> task samples -> method -> generation -> results.

Everything that can be wrong in a config is checked by :func:`RunSpec.from_config` before any model
is loaded. Scores of each sample are computed from its stored prediction by the task's scorer, the
same code ``python -m kvbench.score`` uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import platform
import re
import signal
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import kvbench
from kvbench.cache import KVCache, layer_windows
from kvbench.config import KVBenchConfig, check_config, check_folder_name
from kvbench.decoding import Decoding
from kvbench.errors import ConfigError, DataError
from kvbench.fidelity import greedy_continuation, measure
from kvbench.generation import Generation, Prefilled, generate
from kvbench.methods import build_method, method_class
from kvbench.methods.base import Compression, Method
from kvbench.models import ModelConfig, load_model, model_info
from kvbench.results import (FIDELITY_FIELDS, Completion, Fidelity, KVStats, KVUsage, RunDir, RunIdentity, RunInfo,
                             SCHEMA_VERSION, RunScores, SampleRecord, sample_clusters, sample_scores,
                             summarize_fidelity)
from kvbench.stats import mean_ci
from kvbench.tasks import Sample, Task, build_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    """The configured method, checked once: its class's parsed ``Params`` and the compression.
    Each sample gets a fresh ``Method`` from it (:meth:`new`), because methods hold state."""

    name: str
    params: Any
    compression: Compression | None
    seed: int
    #: the run identity's method, from the method built to check the config
    description: dict[str, Any]

    @classmethod
    def from_config(cls, values: dict[str, Any], ratio: float | None, budget: int | None, seed: int,
                    evict_every: int = 1) -> "MethodSpec":
        values = dict(values)
        name = values.pop("name", None)
        method_cls = method_class(name)
        if method_cls.uses_compression:
            compression = Compression(ratio=ratio, budget=budget, evict_every=evict_every)
        else:
            if ratio is not None or budget is not None:
                Compression(ratio=ratio, budget=budget)  # still reject ratio < 1, or both given
            if ratio not in (None, 1) or budget is not None:
                log.warning("method '%s' does not compress: ratio=%s budget=%s ignored, recorded as ratio 1",
                            name, ratio, budget)
            compression = None
        params = method_cls.parse_params(values)
        # building the method checks what its class can only check against the compression (e.g.
        # quant's achievable ratios), still before any model is loaded
        method = build_method(name, dataclasses.asdict(params), compression, seed)
        return cls(name, params, compression, seed, RunIdentity.method_of(method.describe()))

    def new(self) -> Method:
        return build_method(self.name, dataclasses.asdict(self.params), self.compression, self.seed)

    def setting(self) -> str:
        """``ratio-4`` / ``budget-256`` / ``ratio-1`` (full), plus method parameters that differ from
        the method's defaults and a seed other than the default, so parameter and seed sweeps (e.g.
        LagKV's lag, ``seed=0,1,2``) get separate directories."""
        label = self.compression.label if self.compression else "ratio-1"
        defaults = dataclasses.asdict(method_class(self.name).Params())
        changed = [f"{k}-{v}" for k, v in sorted(dataclasses.asdict(self.params).items()) if defaults.get(k) != v]
        seed = [f"seed-{self.seed}"] if self.seed != KVBenchConfig.seed else []
        return "_".join([label, *changed, *seed])


@dataclass(frozen=True)
class RunSpec:
    """A validated configuration: what to run, before anything heavy is loaded."""

    model: ModelConfig
    method: MethodSpec
    task: Task
    #: the results directory's setting name (:meth:`MethodSpec.setting`)
    setting: str
    results_dir: Path
    seed: int
    limit: int | None
    #: (i, n): this job runs the i-th of n disjoint slices of the samples (None: all of them)
    shard: tuple[int, int] | None
    #: memory for prefill states shared between the ratios of a sweep (0: prefill every run)
    prefill_reuse_gb: float
    #: prompt tokens per prefill step (None: the whole prompt in one step)
    prefill_chunk: int | None
    #: the resolved config, recorded in run.json
    config: dict[str, Any]
    decoding: Decoding = dataclasses.field(default_factory=Decoding)
    #: decoding steps between two points of the held-cache curve
    curve_every: int = 16
    #: record fidelity to the full cache over the gold answer and the greedy output (:meth:`measures_fidelity`)
    fidelity: bool = True

    @classmethod
    def from_config(cls, cfg: KVBenchConfig) -> "RunSpec":
        for group in ("method", "task"):
            if not isinstance(getattr(cfg, group), Mapping):
                raise ConfigError(f"the config has no {group}: choose one with {group}=<name>")
        check_config(cfg)
        cfg.model.validate()
        method = MethodSpec.from_config(cfg.method, cfg.ratio, cfg.budget, cfg.seed, cfg.evict_every)
        task = build_task(cfg.task)
        task.check_data()  # bad data files fail before the model loads
        chunked = f"_prefill_chunk-{cfg.prefill_chunk}" if cfg.prefill_chunk else ""
        return cls(
            model=cfg.model,
            method=method,
            task=task,
            setting=check_folder_name("setting", "_".join(filter(None, [method.setting() + chunked,
                                                                        cfg.decoding.label()]))),
            results_dir=Path(cfg.results_dir),
            seed=cfg.seed,
            limit=cfg.limit,
            shard=parse_shard(cfg.shard),
            prefill_reuse_gb=cfg.prefill_reuse_gb,
            prefill_chunk=cfg.prefill_chunk,
            config=dataclasses.asdict(cfg),
            decoding=cfg.decoding,
            curve_every=cfg.cache_curve_every,
            fidelity=cfg.fidelity,
        )

    def shares_prefill(self, method: Method) -> bool:
        """Whether a prompt's prefill state may serve other runs of it: never for a chunked prefill,
        which depends on the compression between its chunks."""
        return method.shares_prefill and self.prefill_chunk is None

    def measures_fidelity(self) -> bool:
        """Whether records get fidelity to the full cache: with ``fidelity`` on, for a method that
        compresses and a one-step prefill (a chunked one has no uncompressed state to compare with)."""
        return self.fidelity and self.method.compression is not None and self.prefill_chunk is None

    def measures_gold_fidelity(self, sample: Sample) -> bool:
        """Whether a sample's fidelity is also measured over its gold answer: when it has one that
        follows the prompt (not a follow-up)."""
        return (self.measures_fidelity() and bool(sample.answers) and bool(sample.answers[0])
                and not sample.followup)

    def reuses_prefill(self, method: Method) -> bool:
        """Whether samples share prefill states with the other ratios of a sweep (:class:`PrefillStore`)."""
        return self.shares_prefill(method) and self.prefill_reuse_gb > 0

    def run_dir(self, task: Task) -> RunDir:
        return RunDir(self.results_dir / self.model.name / task.name / self.method.name / self.setting)

    def identity(self, task: Task) -> RunIdentity:
        """What must match for a results directory to be resumed instead of rejected."""
        c = self.method.compression
        compression = {"ratio": c.ratio if c else 1, "budget": c.budget if c else None, "label": self.setting}
        # recorded only when set, so identities written before these settings existed still match
        if c and c.evict_every != 1:
            compression["evict_every"] = c.evict_every
        if self.prefill_chunk is not None:
            compression["prefill_chunk"] = self.prefill_chunk
        return RunIdentity(
            model=dataclasses.asdict(self.model),
            method=self.method.description,
            task=task.describe(),
            compression=compression,
            data=task.data_fingerprint(),
            seed=self.seed,
            decoding=dataclasses.asdict(self.decoding),
        )


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)``, 0 <= i < n; None (all samples) stays None."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", str(value).strip())
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(f"shard must be 'i/n' with 0 <= i < n (e.g. shard=0/4), or null for all samples; got {value!r}")
    return int(match[1]), int(match[2])


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    names = ["torch", "transformers", "hydra-core", "datasets", "gguf", "accelerate"]
    found = {}
    for n in names:
        try:
            found[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "kvbench": kvbench.__version__, **found}


_SPLIT = "\x00kvbench-question\x00"


def encode(sample: Sample, tokenizer, model_cfg: ModelConfig, compress: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids of the part prefilled and compressed, and of the part appended uncompressed.

    With a chat template the whole prompt is templated and split where the question starts, so the
    template's closing tokens travel with the question. Both parts are tokenized separately in
    both modes, so the two modes see the same tokens.
    """
    context, question = sample.context, sample.question
    templated = sample.chat_template and model_cfg.chat_template and tokenizer.chat_template
    if templated:
        # A marker between the parts survives templates that trim the message's ends (Llama 3.1's)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + _SPLIT + question}], add_generation_prompt=True, tokenize=False,
            **model_cfg.chat_template_kwargs,
        )
        context, question = full.split(_SPLIT)
    ctx = tokenizer(context, add_special_tokens=not templated, return_tensors="pt").input_ids
    q = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids
    if compress == "whole":
        return torch.cat([ctx, q], dim=1), None
    return ctx, q


def eos_ids(model, tokenizer, stop_tokens: list[str] = ()) -> set[int]:
    """The tokenizer's and generation config's EOS ids, plus the last token id of each stop token
    text (how LongBench's pred.py adds "\n" for samsum)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.update(tokenizer.encode(text, add_special_tokens=False)[-1] for text in stop_tokens)
    return {i for i in ids if i is not None}


class PrefillStore:
    """Uncompressed prefill states of samples run in this process, for the other ratios of a sweep.

    A sequential sweep over ratios (or budgets) runs one job per ratio; for methods whose prefill
    does not depend on the ratio (``Method.shares_prefill``), a later ratio's jobs restore these
    states instead of prefilling again. States are keyed by everything except the compression
    (model, method and parameters, task, seed) and the sample, so the order of the sweep's axes does
    not matter. They are held within ``prefill_reuse_gb``, the oldest dropped first; a sample whose
    state is gone is simply prefilled again.
    """

    def __init__(self):
        self.states: OrderedDict[tuple, Prefilled] = OrderedDict()

    @staticmethod
    def _key(spec: "RunSpec", task: Task, sample_id: str) -> tuple:
        # task.params, not task.describe(): the data's location tells apart two data folders
        return (repr(spec.model), spec.method.name, repr(spec.method.params), task.name, repr(task.params),
                spec.seed, sample_id)

    def get(self, spec: "RunSpec", task: Task, sample_id: str) -> Prefilled | None:
        return self.states.get(self._key(spec, task, sample_id))

    def put(self, spec: "RunSpec", task: Task, sample_id: str, state: Prefilled) -> None:
        limit = spec.prefill_reuse_gb * 2**30
        if state.nbytes() > limit:
            return
        self.states[self._key(spec, task, sample_id)] = state
        while sum(s.nbytes() for s in self.states.values()) > limit:
            self.states.popitem(last=False)


_prefills = PrefillStore()


class GreedyStore:
    """The full cache's greedy continuation of every prompt this process measured fidelity on.

    It depends on neither the method nor its compression, so the other methods and ratios of a sweep
    measure their fidelity against it instead of decoding the full cache again (for a compressed run,
    that decoding is as long as the run's own). It is the output of a greedy run of the full method,
    or else decoded from the first compressed run's uncompressed prefill, the same for every method up
    to float rounding (methods that compute attention themselves do it exactly). Keyed by the model,
    the prompt's and question's token ids and what ends the decoding; token ids only, the ``size``
    most recent kept.
    """

    def __init__(self, size: int = 100_000):
        self.size = size
        self.continuations: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @staticmethod
    def key(spec: "RunSpec", sample: Sample, prompt_ids: torch.Tensor, question_ids: torch.Tensor | None,
            eos: set[int]) -> tuple:
        digest = hashlib.sha256()
        for ids in (prompt_ids, question_ids if question_ids is not None else prompt_ids[:, :0]):
            digest.update(ids.cpu().numpy().tobytes() + b"|")
        return (repr(spec.model), digest.hexdigest(), sample.max_new_tokens, sample.min_new_tokens,
                tuple(sorted(eos)), tuple(sample.stop_strings))

    def get(self, key: tuple) -> torch.Tensor | None:
        return self.continuations.get(key)

    def put(self, key: tuple, ids: torch.Tensor) -> None:
        self.continuations[key] = ids
        while len(self.continuations) > self.size:
            self.continuations.popitem(last=False)


_greedy = GreedyStore()


def run_sample(model, tokenizer, spec: RunSpec, task: Task, sample: Sample) -> SampleRecord:
    """Generate for one sample and return its result record (scored). With ``decoding.n`` samples
    the record is the first one's, plus every sample in ``completions``; its scores are the means."""
    device = next(model.parameters()).device
    prompt_ids, question_ids = encode(sample, tokenizer, spec.model, task.params.compress)
    prompt_ids = prompt_ids.to(device)
    question_ids = question_ids.to(device) if question_ids is not None else None
    def stop_check(tokens):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in sample.stop_strings)
    followup_ids = tokenizer.encode(sample.followup, add_special_tokens=False) if sample.followup else None
    n = spec.decoding.n
    shared: Prefilled | None = None  # the prompt's prefill state, once there is one
    gens = []  # (generation, whether its prefill was restored, seed) of each of the n samples
    fidelity = spec.measures_fidelity()
    sample_fidelity: tuple[Fidelity | None, Fidelity | None] = (None, None)  # gold answer, greedy output
    eos = eos_ids(model, tokenizer, sample.stop_tokens)
    stop = stop_check if sample.stop_strings else None
    for index in range(n):
        method = spec.method.new()
        method.setup(model)
        # a prompt's prefill serves its n samples, and (keep) the other ratios of a sweep
        keep = spec.reuses_prefill(method)
        share = keep or (n > 1 and spec.shares_prefill(method))
        if share and shared is None and keep:
            shared = _prefills.get(spec, task, sample.id)
        restored = shared if share else None
        cache = KVCache(method, layer_windows(model.config))
        seed = spec.decoding.sample_seed(spec.seed, sample.id, index)
        gen = generate(model, cache, prompt_ids, question_ids, sample.max_new_tokens, eos, stop,
                       sample.min_new_tokens,
                       prefilled=restored, keep_prefill=(share or fidelity) and restored is None,
                       decoding=spec.decoding, seeds=[seed], curve_every=spec.curve_every,
                       followup_ids=followup_ids, followup_new_tokens=sample.followup_new_tokens,
                       prefill_chunk=spec.prefill_chunk,
                       keep_compressed=fidelity and index == 0)
        if fidelity and index == 0:
            sample_fidelity = measure_fidelity(model, tokenizer, spec, sample, prompt_ids, question_ids, gen,
                                               restored or gen.prefilled, eos, stop)
        if share and restored is None:
            shared = gen.prefilled
            if keep:
                _prefills.put(spec, task, sample.id, shared)
        gens.append((gen, restored is not None, seed))
    gen, reused, _ = gens[0]
    if spec.method.compression is None and spec.decoding.greedy and spec.prefill_chunk is None and not followup_ids:
        # the full cache decoded greedily, with the stop rules greedy_continuation applies: its output is that
        _greedy.put(GreedyStore.key(spec, sample, prompt_ids, question_ids, eos),
                    torch.tensor(gen.tokens[:1], device=device))
    appended = question_ids.shape[1] if question_ids is not None else 0
    record = SampleRecord(
        id=sample.id,
        task=task.name,
        pred=tokenizer.decode(gen.tokens[0], skip_special_tokens=True),
        answers=sample.answers,
        meta=sample.meta,
        prompt_tokens=prompt_ids.shape[1] + appended,
        appended_tokens=appended,
        new_tokens=len(gen.tokens[0]),
        stopped_by=gen.stopped_by[0],
        prefill_s=round(gen.prefill_s, 4),
        # a reused prefill's time is its restore and compression only: the forward ran for another ratio
        prefill_reused=reused,
        decode_s=round(gen.decode_s, 4),
        compress_s=round(gen.compress_s, 4),
        decode_compress_s=round(gen.decode_compress_s, 4),
        kv=KVUsage(after_prefill=KVStats(**gen.after_prefill), at_end=KVStats(**gen.at_end),
                   peak_bytes_held=gen.peak_bytes_held, peak_bytes_in_step=gen.peak_bytes_in_step,
                   peak_tokens_held=gen.peak_tokens_held, curve=gen.curve,
                   decode_bytes_read=gen.decode_bytes_read),
        finished_at=_now(),
        fidelity=sample_fidelity[0],
        fidelity_greedy=sample_fidelity[1],
        cluster=sample.cluster,
    )
    if n > 1:
        record.completions = [
            Completion(seed=seed, pred=tokenizer.decode(g.tokens[0], skip_special_tokens=True),
                       new_tokens=len(g.tokens[0]), stopped_by=g.stopped_by[0], prefill_s=round(g.prefill_s, 4),
                       decode_s=round(g.decode_s, 4), peak_tokens_held=g.peak_tokens_held)
            for g, _, seed in gens]
    record.scores = task.score_record(record)
    return record


def measure_fidelity(model, tokenizer, spec: RunSpec, sample: Sample, prompt_ids: torch.Tensor,
                     question_ids: torch.Tensor | None, gen: Generation, prefilled: Prefilled,
                     eos: set[int], stop_check) -> tuple[Fidelity | None, Fidelity | None]:
    """The fidelity of the cache ``gen`` decoded from (``keep_compressed``) to the full cache of
    the prompt ``prefilled`` (its uncompressed prefill state): over the first gold answer, tokenised
    on its own as the continuation of the prompt and question (None without one, or when it follows
    a follow-up: :meth:`RunSpec.measures_gold_fidelity`), and over the full cache's greedy
    continuation, decoded as the sample's generation is (its limits and stop rules)."""
    device = next(model.parameters()).device
    gold = None
    if spec.measures_gold_fidelity(sample):
        answer_ids = tokenizer(sample.answers[0], add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        if answer_ids.shape[1]:
            gold = measure(model, prefilled, question_ids, gen.compressed, answer_ids)
    key = GreedyStore.key(spec, sample, prompt_ids, question_ids, eos)
    greedy_ids = _greedy.get(key)
    if greedy_ids is None:
        greedy_ids = greedy_continuation(model, prefilled, prompt_ids, question_ids, sample.max_new_tokens, eos,
                                         stop_check, sample.min_new_tokens)
        _greedy.put(key, greedy_ids)
    return gold, measure(model, prefilled, question_ids, gen.compressed, greedy_ids)


def summarize_run(task: Task, records: list[SampleRecord], n_expected: int) -> RunScores:
    """scores.json: the task's scores plus completeness and measured compression."""
    summary = task.summarize(records)

    def mean_of(values):
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    decode_s = sum(r.decode_s for r in records)
    per_sample = sample_scores(records, task.main_metric)
    clusters = sample_clusters(records)
    interval = mean_ci(list(per_sample.values()), clusters and list(clusters.values())) if per_sample else None
    return RunScores(
        task=task.name,
        metric=task.main_metric,
        score=summary.get(task.main_metric),
        metrics=summary,
        n=len(records),
        n_expected=n_expected,
        complete=len(records) == n_expected,
        measured_ratio=mean_of(r.kv.after_prefill.ratio for r in records),
        tokens_held=mean_of(r.kv.after_prefill.tokens_held for r in records),
        bytes_held=mean_of(r.kv.after_prefill.bytes_held for r in records),
        peak_bytes_held=mean_of(r.kv.peak_bytes_held for r in records),
        decode_tokens_per_s=sum(r.new_tokens for r in records) / decode_s if decode_s else None,
        **({"ci95": [round(v, 2) for v in interval.columns().values()], "ci_method": interval.method,
            "ci_resamples": interval.resamples, "ci_seed": interval.seed} if interval else {}),
        **{name: summarize_fidelity(records, over) for over, name in FIDELITY_FIELDS.items()},
    )


#: the signals that stop a job, and the handler each must still have for kvbench to take it over
#: (Python's own SIGINT handler raises KeyboardInterrupt; SIGTERM's default kills the process)
_STOP_SIGNALS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}


@contextlib.contextmanager
def _signals_exit():
    """Turn SIGTERM and SIGINT (Ctrl-C) into ``SystemExit(128 + signal number)`` (143 and 130, the
    shell's codes for death by these signals), raised wherever the job is: the sample in flight is
    abandoned, and the job records its status and the scores of what finished before it exits,
    without a traceback.

    SIGTERM is how Slurm preempts, cancels and ends jobs at their time limit, and its SIGKILL follows
    after a grace period (KillWait, 30 s by default) that is often shorter than one long-context
    sample. Finished records are on disk already and a record is a single write, so unwinding from
    anywhere loses nothing else. The non-zero exit tells Slurm and the caller that the run did not
    end; running it again resumes it.

    A handler someone else installed is left alone: submitit ignores SIGTERM on purpose and
    checkpoints and requeues on its own signal (USR2), which also ends in SystemExit here.
    """
    # only the main thread may set handlers
    main = threading.current_thread() is threading.main_thread()
    ours = [s for s, default in _STOP_SIGNALS.items() if main and signal.getsignal(s) == default]

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    for signum in ours:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum in ours:
            signal.signal(signum, _STOP_SIGNALS[signum])


def _finish(run_dir: RunDir, task: Task, ids: list[str], info: RunInfo, stopped: bool = False) -> RunScores:
    """Recompute scores.json and run.json from every record in the directory (all shards and jobs)
    and return the scores. Under the directory lock: records only accumulate, so whichever job
    writes last also saw the most records.

    status: ``complete`` once every expected sample is present; otherwise ``interrupted`` (this job
    was stopped by a signal) or ``partial`` (this job ended; other shards or jobs still owe samples).
    """
    wanted = set(ids)
    with run_dir.lock():
        records = [r for r in run_dir.records(warn=False) if r.id in wanted]
        scores = summarize_run(task, records, len(ids))
        run_dir.write_scores(scores)
        status = "complete" if scores.complete else "interrupted" if stopped else "partial"
        run_dir.write_run(dataclasses.replace(info, status=status, finished=_now()))
    return scores


def run_task(model, tokenizer, spec: RunSpec, task: Task) -> dict:
    """Run (or resume) this job's share of one task into its results directory; return the scores.json
    content of the whole directory.

    Several jobs may write one directory at once (the shards of a configuration, a requeued job, the
    same configuration started twice): each sample is claimed before it runs, records are appended
    under the directory lock, and every job ends by recomputing run.json and scores.json.
    """
    run_dir = spec.run_dir(task)
    identity = spec.identity(task)
    samples = task.samples(tokenizer, spec.model)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"task {task.name} produced duplicate sample ids: {', '.join(map(repr, repeated))}")
    # limit runs the first samples of the task's own list: the directory expects every sample of the
    # task, so a limited run is partial and a later run without limit completes it
    chosen = samples if spec.limit is None else samples[: spec.limit]
    # a stride, not a block: tasks list samples by length, so every shard gets a similar amount of work
    mine = chosen if spec.shard is None else chosen[spec.shard[0] :: spec.shard[1]]
    info = RunInfo(
        identity=identity,
        config=spec.config,
        model_info=model_info(model),
        versions=_versions(),
        git_commit=_git_commit(),
        host=platform.node(),
        n_expected=len(samples),
        status="running",
    )
    with run_dir.lock():
        previous = run_dir.read_run()
        differing = identity.differences(previous.identity) if previous is not None else []
        if differing:
            raise ConfigError(
                f"{run_dir.path} holds results of a different configuration (differs in: {', '.join(differing)}); "
                "choose another results_dir or remove that directory"
            )
        done = {r.id for r in run_dir.records()}
        # a complete directory in this schema is left as it is: its run.json keeps the commit, versions
        # and times of the jobs that wrote its samples (a published tree does not change when a sweep
        # passes over its finished cells)
        finished = None
        if (previous is not None and previous.status == "complete" and previous.schema_version == SCHEMA_VERSION
                and done >= set(ids)):
            finished = run_dir.read_scores()
        if finished is None:
            # a directory written by an older kvbench is taken over: run.json is rewritten in this schema
            info = dataclasses.replace(info, started=previous.started if previous else _now())
            run_dir.write_run(info)
    todo = [s for s in mine if s.id not in done]
    label = f"[{spec.model.name} | {task.name} | {spec.method.name} {spec.setting}]"
    share = (f" (limit: the first {len(chosen)} of {len(samples)})" if spec.limit is not None else "") + (
        f" (shard {spec.shard[0]}/{spec.shard[1]} of {len(chosen)})" if spec.shard else "")
    print(f"{label} {len(mine)} samples{share}, {len(mine) - len(todo)} already done -> {run_dir.path}", flush=True)
    if finished is not None:
        return _result(run_dir, spec, finished)
    try:
        with _signals_exit():
            for i, sample in enumerate(todo, start=len(mine) - len(todo) + 1):
                t0 = time.perf_counter()
                with run_dir.claim(sample.id) as claimed:
                    # another live job runs this sample, or finished it after `done` was read
                    if not claimed or sample.id in {r.id for r in run_dir.records(warn=False)}:
                        print(f"{label} {i}/{len(mine)} {sample.id}: left to another job", flush=True)
                        continue
                    record = run_sample(model, tokenizer, spec, task, sample)
                    run_dir.append(record)
                scores = " ".join(f"{k}={v:.2f}" for k, v in record.scores.items())
                print(f"{label} {i}/{len(mine)} {sample.id}: {scores} | {record.prompt_tokens} tok, "
                      f"held {record.kv.after_prefill.ratio:.2f}x | {time.perf_counter() - t0:.1f}s", flush=True)
    except SystemExit:  # a signal stopped the job (SIGTERM, SIGINT, submitit's USR2): say so in run.json
        _finish(run_dir, task, ids, info, stopped=True)
        raise
    return _result(run_dir, spec, _finish(run_dir, task, ids, info))


def _result(run_dir: RunDir, spec: RunSpec, scores: RunScores) -> dict:
    """A job's summary of one directory: where it is, what ran, and its scores.json content."""
    return {"dir": str(run_dir.path), "model": spec.model.name, "method": spec.method.name,
            "setting": spec.setting, **scores.to_json()}


def run(cfg: KVBenchConfig) -> list[dict]:
    """Run every task of a configuration; return their scores (one dict per results directory)."""
    spec = RunSpec.from_config(cfg)
    model, tokenizer = load_model(spec.model)
    spec.method.new().setup(model)  # what the model makes impossible fails before the first sample
    torch.manual_seed(spec.seed)
    return [run_task(model, tokenizer, spec, task) for task in spec.task.subtasks()]
