"""RULER (Hsieh et al. 2024, NVIDIA/RULER): its 13 synthetic tasks, generated for the model's own
tokenizer at each target length, or kvpress's pre-generated set (``simonjegou/ruler``).

One configured ``ruler`` task is a suite: :meth:`Ruler.subtasks` returns one task per RULER task,
named ``ruler/<name>`` (``ruler/niah_single_1``, ..., ``ruler/qa_2``), each with its own results
directory. Prompts, answer prefixes, tokens to generate and the tasks' arguments are RULER's
(``kvbench/task_data/ruler/tasks.yaml``); scoring is :mod:`kvbench.scoring.ruler`.

Generation (``source: generate``) follows RULER's ``scripts/data/synthetic/*.py``:

- **niah**: needles "One of the special magic {type_needle_v} for {key} is: {value}." with keys and
  values that are adjective-noun words (wonderwords' lists), 7-digit numbers or uuid4s; the haystack
  is the repeated noise sentence, the Paul Graham essays (cut by words, needles inserted between
  sentences at depths drawn from 40 evenly spaced percentages) or distractor needles (noise and
  needle haystacks take the needles at random line indexes). The queried keys' values are the
  answers; with one query and one value the template is put in the singular as RULER does.
- **vt**: one chain of 5 five-letter variables (``VAR A = 12345``, ``VAR B = VAR A`` ...) at random
  lines of the noise haystack, after a one-shot example (three-letter names, sized to 500 tokens,
  its names and value redrawn per sample).
- **cwe**: a numbered list of words where 10 common words appear 30 times and the others 3 times
  (6 and 1 below 4096 tokens), after a one-shot example (40 words at 10/3, or 20 words at 3/1).
- **fwe**: coded 6-letter words with Zipf(alpha=2) counts over a vocabulary of length // 50 words;
  the most frequent is "..." (noise) and the answers are the next three.
- **qa**: SQuAD (qa_1) or HotpotQA (qa_2) questions in dataset order, their own paragraphs plus
  distractor paragraphs ("Document {i}:\\n..."), shuffled. The i-th sample of every length asks the
  i-th question, and consecutive SQuAD questions often ask about one paragraph, so the samples whose
  questions have the same own paragraphs form one cluster (``Sample.cluster``): intervals and paired
  tests resample those, not samples. The other tasks draw every sample's content from its own
  generator (a haystack of its own), so their samples are not clustered.

Length: the number of haystack units (noise sentences, essay words, distractor needles, listed
words, coded words, documents) is searched so that prompt tokens + tokens to generate <= the target
length, counted in the model's own tokenizer exactly as the runner will tokenize the prompt: a
binary search from an estimate of tokens per unit (RULER's), done once per length on the first
sample; a later sample that does not fit is searched again below that size. fwe sizes the prompt
alone to the target length, as RULER's freq_words_extraction.py does.

Template (``template``):

``base`` (default)
    RULER's ``base`` model template: the task text and answer prefix as they are, no chat wrapper
    (the tokenizer's BOS is added as usual). This is how RULER and kvpress's hub set are generated.
``chat``
    the model's own chat template (when the model config allows it and the tokenizer has one):
    the task text is the user message and the answer prefix follows the assistant header, as RULER's
    chat templates and kvpress's pipeline place it. The one-shot examples of vt and cwe stay in the
    user message.

The prompt splits into a context part (up to the text after ``{context}``) and a question part (the
query and the answer prefix), which ``compress: context`` appends uncompressed (kvpress's split).

Choices RULER leaves to its libraries: sentences are split after ``.``, ``!`` or ``?`` followed by
whitespace (RULER uses NLTK's Punkt, which needs a download); words for niah keys draw an
adjective and a noun independently (RULER draws from the deduplicated product of the lists);
variable names never equal ``VAR``. Every sample draws from its own generator seeded by (seed,
task, length, index), so samples are reproducible one by one.

Report: besides a table per task, the leaderboard gets RULER's own table (:meth:`Ruler.tables`):
the tasks' mean at each length, the plain and weighted means over lengths and the effective length.

``source: kvpress`` reads kvpress's set (columns context, question, answer_prefix, answer, task,
max_new_tokens; configs 4096/8192/16384; Llama-3.1-8B tokenizer, ``base`` template) from the hub or
from ``kvpress_dir`` (a copy of the hub repository: ``<kvpress_dir>/<length>/*.parquet``), and
builds prompts as kvpress's pipeline does: without a chat template the context gets the BOS and the
question part is question + "\\n" + answer prefix; with ``template: chat`` the question part is
question + the template's closing + answer prefix.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, NamedTuple

from kvbench.errors import ConfigError, DataError
from kvbench.params import param
from kvbench.results import SampleRecord
from kvbench.scoring.ruler import PREFIX, SAMPLE_SCORERS, SPEC, TASK_NAMES, TASK_SCORERS, metric_of
from kvbench.scoring.ruler import EFFECTIVE_THRESHOLD, base_task, effective_length, weighted_average
from kvbench.tasks import ReportRun, TaskTable
from kvbench.tasks import register
from kvbench.tasks.base import Sample, Task, compress_mode, files_fingerprint, location, read_json, require_fields

TEMPLATES = ("base", "chat")
SOURCES = ("generate", "kvpress")
KVPRESS_HUB = "simonjegou/ruler"
KVPRESS_LENGTHS = (4096, 8192, 16384)
KVPRESS_COLUMNS = ("context", "question", "answer_prefix", "answer", "task", "max_new_tokens")

#: RULER's data files (the names its download scripts write) and where they come from
DATA_FILES = {
    "essay": "PaulGrahamEssays.json",
    "squad": "squad.json",
    "hotpotqa": "hotpotqa.json",
}
DATA_HELP = {
    "essay": ("the Paul Graham essays haystack: RULER's PaulGrahamEssays.json ({\"text\": ...}, "
              "written by its scripts/data/synthetic/json/download_paulgraham_essay.py)"),
    "squad": ("SQuAD v2.0 dev (https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json, "
              "saved as squad.json)"),
    "hotpotqa": ("HotpotQA dev distractor (http://curtis.ml.cmu.edu/datasets/hotpot/"
                 "hotpot_dev_distractor_v1.json, saved as hotpotqa.json)"),
}
#: hub copies of the QA sets, read when no data_dir is given (the essays have none)
HUB_QA = {"squad": ("rajpurkar/squad_v2", None), "hotpotqa": ("hotpotqa/hotpot_qa", "distractor")}

#: RULER's needle depths: 40 evenly spaced percentages, rounded
DEPTHS = [round(i * 100 / 39) for i in range(40)]
#: sentence ends (RULER: NLTK's Punkt)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class RulerParams:
    #: RULER task names; null = all 13, in synthetic.yaml's order
    tasks: list[str] | None = None
    #: target lengths in tokens (prompt + tokens to generate); RULER: 4096 ... 131072
    lengths: list[int] = param([1024, 2048], ge=1)
    #: samples per task and length (RULER: 500); null = every row of kvpress's set
    samples_per_length: int | None = param(5, ge=1)
    seed: int = 42
    #: base: RULER's base template, no chat wrapper (default); chat: the model's chat template
    template: str = param("base", choices=TEMPLATES)
    #: generate: RULER's generators; kvpress: kvpress's pre-generated set
    source: str = param("generate", choices=SOURCES)
    #: folder of RULER's data files (PaulGrahamEssays.json, squad.json, hotpotqa.json);
    #: null = SQuAD and HotpotQA from the hub, and no essay tasks. Not part of the run identity:
    #: the content of the files read is
    data_dir: str | None = location()
    #: local copy of simonjegou/ruler (<dir>/<length>/*.parquet); null = the hub
    kvpress_dir: str | None = location()
    #: whole: the question is compressed with the context; context: appended after, uncompressed
    compress: str = compress_mode()

    def validate(self) -> None:
        if self.tasks is None:
            self.tasks = list(TASK_NAMES)
        for name in self.tasks:
            if name not in TASK_NAMES:
                raise ConfigError(f"unknown RULER task '{name}'; valid tasks: {', '.join(TASK_NAMES)}")
        if self.samples_per_length is None and self.source != "kvpress":
            raise ConfigError("ruler samples_per_length may be null (every row) only with source=kvpress")
        if self.source == "kvpress":
            other = sorted(set(self.lengths) - set(KVPRESS_LENGTHS))
            if other:
                raise ConfigError(f"kvpress's RULER set has lengths {KVPRESS_LENGTHS}, not {other}")
        else:
            check_data(self.tasks, self.data_dir)  # fail before the model loads


def needs(task: str) -> str | None:
    """The external data a generated task reads: "essay", "squad", "hotpotqa" or None."""
    spec = SPEC["tasks"][task]
    if spec["generator"] == "qa":
        return spec["args"]["dataset"]
    return "essay" if spec["args"].get("type_haystack") == "essay" else None


def check_data(tasks: list[str], data_dir: str | None) -> None:
    """A ConfigError naming each missing data file and the tasks that need it."""
    missing = {}
    for task in tasks:
        kind = needs(task)
        if kind is None or (data_dir is None and kind in HUB_QA):
            continue
        if data_dir is None or not (Path(data_dir) / DATA_FILES[kind]).is_file():
            missing.setdefault(kind, []).append(task)
    if not missing:
        return
    where = (f"data_dir {data_dir} has no " if data_dir is not None else "no data_dir given, and there is no hub copy of ")
    lines = [f"{where}{DATA_FILES[kind]}, which RULER task(s) {', '.join(ts)} need: {DATA_HELP[kind]}"
             for kind, ts in missing.items()]
    offline = [t for t in TASK_NAMES if needs(t) is None]
    raise ConfigError("; ".join(lines) + f". Put the file(s) in a folder and pass data_dir=<folder> "
                      f"(or task.data_dir=...), run the tasks that need no data (task.tasks=[{','.join(offline)}]), "
                      "or use kvpress's pre-generated set (task.source=kvpress)")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def essay_words(data_dir: str) -> tuple[str, ...]:
    """The essays, whitespace-normalised and split into words (RULER's haystack units)."""
    path = Path(data_dir) / DATA_FILES["essay"]
    data = require_fields(read_json(path), str(path), {"text": str})
    if not data["text"].strip():
        raise DataError(f"{path}: field 'text' is empty")
    return tuple(re.sub(r"\s+", " ", data["text"]).split(" "))


class QA(NamedTuple):
    query: str
    answers: list[str]
    docs: list[int]
    #: the other paragraphs of the same article (SQuAD), preferred as distractors
    more: list[int]


def check_squad(data: Any, source: str) -> None:
    """A DataError naming the entry (``squad.json: data[3].paragraphs[0].qas[2]``) of the first field
    :func:`read_squad` needs that is missing or of the wrong type."""
    for a, article in enumerate(require_fields(data, source, {"data": list})["data"]):
        where = f"{source}: data[{a}]"
        for p, paragraph in enumerate(require_fields(article, where, {"paragraphs": list})["paragraphs"]):
            at = f"{where}.paragraphs[{p}]"
            for q, qa in enumerate(require_fields(paragraph, at, {"context": str, "qas": list})["qas"]):
                entry = f"{at}.qas[{q}]"
                require_fields(qa, entry, {"question": str, "is_impossible": bool, "answers": list})
                for n, answer in enumerate(qa["answers"]):
                    require_fields(answer, f"{entry}.answers[{n}]", {"text": str})


def check_hotpotqa(data: Any, source: str) -> None:
    """A DataError naming the entry (``hotpotqa.json: [12]``) of the first field
    :func:`read_hotpotqa` needs that is missing or of the wrong type."""
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of questions, got {type(data).__name__}")
    for i, row in enumerate(data):
        where = f"{source}: [{i}]"
        row = require_fields(row, where, {"question": str, "answer": str, "context": list})
        for p, paragraph in enumerate(row["context"]):
            if not (isinstance(paragraph, list) and len(paragraph) == 2 and isinstance(paragraph[0], str)
                    and isinstance(paragraph[1], list) and all(isinstance(s, str) for s in paragraph[1])):
                raise DataError(f"{where}.context[{p}]: expected [title, [sentences...]]")


def read_squad(data: Any) -> tuple[list[QA], list[str]]:
    """RULER's qa.py reading of SQuAD v2.0: unique paragraphs (sorted) and the answerable questions."""
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for article in data["data"]:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            own = index[p["context"]]
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    qas.append(QA(qa["question"], [a["text"] for a in qa["answers"]], [own],
                                  [i for i in article_docs if i != own]))
    return qas, docs


def read_hotpotqa(data: Any) -> tuple[list[QA], list[str]]:
    """RULER's qa.py reading of HotpotQA: documents "title\\nsentences" (sorted), each question with
    its ten paragraphs."""
    def doc(title, sentences):
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(t, s) for d in data for t, s in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    return [QA(d["question"], [d["answer"]], [index[doc(t, s)] for t, s in d["context"]], [])
            for d in data], docs


def _squad_from_hub(rows) -> dict:
    """Hub rows (one per question) back into the SQuAD file's article/paragraph nesting (a paragraph
    without questions has no row, so it is absent)."""
    articles: list[dict] = []
    for row in rows:
        if not articles or articles[-1]["title"] != row["title"]:
            articles.append({"title": row["title"], "paragraphs": []})
        paragraphs = articles[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != row["context"]:
            paragraphs.append({"context": row["context"], "qas": []})
        texts = list(row["answers"]["text"])
        paragraphs[-1]["qas"].append({"question": row["question"], "is_impossible": not texts,
                                      "answers": [{"text": t} for t in texts]})
    return {"data": articles}


def _hotpotqa_from_hub(rows) -> list:
    return [{"question": r["question"], "answer": r["answer"],
             "context": [[t, list(s)] for t, s in zip(r["context"]["title"], r["context"]["sentences"])]}
            for r in rows]


@lru_cache(maxsize=None)
def qa_set(kind: str, data_dir: str | None) -> tuple[list[QA], list[str]]:
    """(questions, documents) of SQuAD or HotpotQA, from data_dir or the hub."""
    if data_dir is not None:
        path = Path(data_dir) / DATA_FILES[kind]
        data = read_json(path)
        (check_squad if kind == "squad" else check_hotpotqa)(data, str(path))
    else:
        name, config = HUB_QA[kind]
        try:
            from datasets import load_dataset

            rows = load_dataset(name, config, split="validation")
        except Exception as err:  # offline, renamed dataset...
            raise ConfigError(f"could not load {name} from the Hugging Face hub ({type(err).__name__}: {err}); "
                              f"without hub access put {DATA_HELP[kind]} in a folder and pass data_dir=<folder>") from err
        path = name
        data = _squad_from_hub(rows) if kind == "squad" else _hotpotqa_from_hub(rows)
    qas, docs = read_squad(data) if kind == "squad" else read_hotpotqa(data)
    if not qas:
        raise DataError(f"{path} has no answerable questions")
    return qas, docs


@lru_cache(maxsize=1)
def word_lists() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """wonderwords' noun, adjective and verb lists (its asset files, one word a line), which RULER
    draws its words from."""
    assets = resources.files("wonderwords.assets")
    return tuple(tuple(line.rstrip() for line in assets.joinpath(f"{kind}list.txt").read_text().splitlines())
                 for kind in ("noun", "adjective", "verb"))


# ---------------------------------------------------------------------------------------------
# Generators: a prompt from a number of haystack units and a seeded generator
# ---------------------------------------------------------------------------------------------


class Prompt(NamedTuple):
    """A RULER prompt before the chat wrapper: ``preamble + template + answer_prefix`` formatted
    with ``fields``."""

    template: str
    answer_prefix: str
    fields: dict[str, Any]
    answers: list[str]
    meta: dict[str, Any]
    #: text before the task template (the one-shot examples of vt and cwe)
    preamble: str = ""
    #: ``Sample.cluster``: what samples share (qa: the question's own documents), else None
    cluster: str | None = None

    def parts(self) -> tuple[str, str, str]:
        """(context part, query, answer prefix), formatted: the query starts after ``{context}``
        and the whitespace that follows it."""
        head, tail = self.template.split("{context}")
        query = tail.lstrip()
        context = self.preamble + head.format(**self.fields) + self.fields["context"] + tail[: len(tail) - len(query)]
        return context, query.format(**self.fields), self.answer_prefix.format(**self.fields)

    def text(self) -> str:
        return "".join(self.parts())


def split_sentences(text: str) -> list[str]:
    return SENTENCE_END.split(text.strip())


def essay_text(words: tuple[str, ...], n: int) -> str:
    """The first n words, the essays repeated when n exceeds them (RULER's newer generators)."""
    repeats = -(-n // len(words))
    return " ".join((words * repeats)[:n])


def insert_at_depths(sentences: list[str], items: list[str], depths: list[int]) -> str:
    """RULER's essay insertion: each item after the sentence at int(len * depth / 100)."""
    cuts = [0] + sorted(int(len(sentences) * d / 100) for d in depths) + [len(sentences)]
    pieces = []
    for i in range(1, len(cuts)):
        pieces.append(" ".join(sentences[cuts[i - 1]: cuts[i]]))
        if i - 1 < len(items):
            pieces.append(items[i - 1])
    return " ".join(pieces)


def insert_at_random_lines(lines: list[str], items: list[str], rng: random.Random) -> tuple[list[str], list[int]]:
    """RULER's noise/needle insertion: items at random distinct indexes, inserted from the highest
    index down; returns the lines and the drawn indexes (ascending)."""
    indexes = sorted(rng.sample(range(len(lines)), len(items)), reverse=True)
    lines = list(lines)
    for index, item in zip(indexes, items):
        lines.insert(index, item)
    return lines, indexes[::-1]


class Generator:
    """One RULER task's generator, for one target length."""

    #: RULER's first haystack size, used to estimate tokens per unit
    probe_units = 10
    #: whether the tokens to generate count against the target length
    counts_generation = True

    def __init__(self, task: str, params: RulerParams, length: int, count: Callable[[str, str], int]):
        spec = SPEC["tasks"][task]
        self.task, self.params, self.length, self.count = task, params, length, count
        self.args = spec["args"]
        self.prompt = SPEC["prompts"][spec["generator"]]

    @property
    def tokens_to_generate(self) -> int:
        return self.prompt["tokens_to_generate"]

    def min_units(self, index: int) -> int:
        return 1

    def max_units(self) -> int | None:
        """The most units the generator has (None: no limit)."""
        return None

    def build(self, n: int, rng: random.Random, index: int) -> Prompt:
        raise NotImplementedError


class Niah(Generator):
    def __init__(self, task, params, length, count):
        super().__init__(task, params, length, count)
        a = self.args
        self.num_k = max(a["num_needle_k"], a["num_needle_q"])
        self.haystack = a["type_haystack"]
        self.probe_units = {"essay": 500}.get(self.haystack, 25 if length >= 4096 else 5)
        if self.haystack == "essay":
            self.words = essay_words(params.data_dir)

    def min_units(self, index):
        # noise and needle haystacks need a line per needle to draw distinct indexes from
        return 1 if self.haystack == "essay" else self.num_k * self.args["num_needle_v"]

    def draw(self, kind: str, rng: random.Random) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            nouns, adjectives, _ = word_lists()
            return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def build(self, n, rng, index):
        a = self.args
        type_v = a["type_needle_v"]
        keys, values, needles = [], [], []
        for _ in range(self.num_k):
            keys.append(self.draw(a["type_needle_k"], rng))
            values.append([self.draw(type_v, rng) for _ in range(a["num_needle_v"])])
            needles += [SPEC["needle"].format(type_needle_v=type_v, key=keys[-1], value=v) for v in values[-1]]
        rng.shuffle(needles)
        meta: dict[str, Any] = {"needles": needles}
        if self.haystack == "essay":
            depths = rng.sample(DEPTHS, len(needles))
            context = insert_at_depths(split_sentences(essay_text(self.words, n)), needles, depths)
            meta["depths"] = sorted(depths)
        else:
            if self.haystack == "noise":
                lines = [SPEC["noise"]] * n
            else:
                lines = [SPEC["needle"].format(type_needle_v=type_v, key=self.draw(a["type_needle_k"], rng),
                                               value=self.draw(type_v, rng)) for _ in range(n)]
            lines, meta["indexes"] = insert_at_random_lines(lines, needles, rng)
            context = "\n".join(lines)
        queried = rng.sample(range(self.num_k), a["num_needle_q"])
        queries = [keys[i] for i in queried]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix = self.prompt["template"], self.prompt["answer_prefix"]
        if a["num_needle_q"] * a["num_needle_v"] == 1:  # RULER's singular form of the template
            template, prefix = (singular(t) for t in (template, prefix))
            type_v = type_v[:-1]
        return Prompt(template, prefix, {"context": context, "query": query, "type_needle_v": type_v},
                      [v for i in queried for v in values[i]], meta)


def singular(text: str) -> str:
    for plural, one in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(plural, one)
    return text


class VariableTracking(Generator):
    #: RULER sizes its one-shot example to this many tokens
    ICL_TOKENS = 500

    def __init__(self, task, params, length, count):
        super().__init__(task, params, length, count)
        self.hops = self.args["num_hops"]
        self.probe_units = 10 if length >= 4096 else 5
        self.icl = self.one_shot()

    def min_units(self, index):
        return self.hops + 1

    def chain_prompt(self, n: int, names: list[str], value: str, rng: random.Random) -> Prompt:
        """The task text with one chain ``VAR names[0] = value``, ``VAR names[j] = VAR names[j-1]``."""
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(self.hops)]
        positions = sorted(rng.sample(range(n), len(chain)))
        lines = [SPEC["noise"]] * n
        for j, (at, link) in enumerate(zip(positions, chain)):
            lines.insert(at + j, link)
        return Prompt(self.prompt["template"], self.prompt["answer_prefix"],
                      {"context": "\n".join(lines), "query": value, "num_v": self.hops + 1},
                      names, {"positions": positions})

    def one_shot(self) -> Prompt:
        """RULER's example: 3-letter names, value 12345, the most noise that fits in ICL_TOKENS
        tokens (task text alone), drawn once from the seed."""
        def build(n):
            rng = random.Random(f"{self.params.seed}-{self.task}-example")
            return self.chain_prompt(n, self.names(3, rng), "12345", rng)

        n = size_haystack(lambda n: self.count(build(n).text(), ""), self.ICL_TOKENS, self.hops + 1, 5)
        if n is None:
            raise ConfigError(f"the tokenizer cannot fit RULER's vt example in {self.ICL_TOKENS} tokens")
        return build(n)

    def names(self, letters: int, rng: random.Random) -> list[str]:
        names: list[str] = []
        while len(names) < self.hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names and name != "VAR":  # "VAR" would be read as the keyword
                names.append(name)
        return names

    def example_text(self, rng: random.Random) -> str:
        """The example with fresh names and value (RULER's randomize_icl), followed by its answer."""
        text = self.icl.text()
        new_names = self.names(3, rng)
        for old, new in zip(self.icl.answers, new_names):
            text = text.replace(old, new)
        text = text.replace("12345", str(rng.randrange(10000, 99999)))
        return text + " " + " ".join(new_names) + "\n"

    def build(self, n, rng, index):
        example = self.example_text(rng)
        prompt = self.chain_prompt(n, self.names(5, rng), str(rng.randrange(10000, 99999)), rng)
        return prompt._replace(preamble=example + "\n")


class CommonWords(Generator):
    #: RULER estimates tokens per word from a list of 4096 words (the example is small beside it)
    probe_units = 4096

    def __init__(self, task, params, length, count):
        super().__init__(task, params, length, count)
        nouns, adjectives, verbs = word_lists()
        self.words = sorted(set(nouns + adjectives + verbs))
        # RULER: fewer repeats and a smaller example below 4096 tokens
        short = length < 4096
        self.repeats = (6, 1) if short else (self.args["freq_cw"], self.args["freq_ucw"])
        self.example = (20, 3, 1) if short else (40, 10, 3)

    def min_units(self, index):
        return self.args["num_cw"]

    def max_units(self):
        # beyond these RULER draws from its english_words.json, which kvbench does not ship
        return len(self.words)

    def word_list(self, num_words: int, common: int, uncommon: int, rng: random.Random) -> tuple[str, list[str]]:
        chosen = rng.sample(self.words, num_words)
        top, rest = chosen[: self.args["num_cw"]], chosen[self.args["num_cw"]:]
        listed = top * common + rest * uncommon
        rng.shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top

    def build(self, n, rng, index):
        template, prefix = self.prompt["template"], self.prompt["answer_prefix"]
        examples = []
        for _ in range(self.args["num_fewshot"]):
            context, top = self.word_list(*self.example, rng)
            shot = Prompt(template, prefix, {"context": context}, top, {}).text()
            examples.append(shot + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(top)))
        context, top = self.word_list(n, *self.repeats, rng)
        return Prompt(template, prefix, {"context": context}, top, {}, preamble="\n".join(examples) + "\n")


class FrequentWords(Generator):
    counts_generation = False  # RULER sizes the prompt alone to the length

    def __init__(self, task, params, length, count):
        super().__init__(task, params, length, count)
        self.vocab_size = length // 50
        self.probe_units = max(1, length // self.args["coded_wordlen"])
        self.zeta = zeta(self.args["alpha"])

    def build(self, n, rng, index):
        size, letters, alpha = self.vocab_size, self.args["coded_wordlen"], self.args["alpha"]
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=letters)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # the most frequent word is noise
        words = [w for k, w in enumerate(ranked, start=1) for _ in range(int(n * k**-alpha / self.zeta))]
        rng.shuffle(words)
        return Prompt(self.prompt["template"], self.prompt["answer_prefix"], {"context": " ".join(words)},
                      ranked[1:4], {})


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha), alpha > 1 (RULER: scipy.special.zeta): the first terms summed, the tail
    by Euler-Maclaurin, exact to double precision."""
    head = math.fsum(k**-alpha for k in range(1, terms))
    n = float(terms)
    return head + n ** (1 - alpha) / (alpha - 1) + n**-alpha / 2 + alpha * n ** (-alpha - 1) / 12


class QuestionAnswering(Generator):
    def __init__(self, task, params, length, count):
        super().__init__(task, params, length, count)
        self.qas, self.docs = qa_set(self.args["dataset"], params.data_dir)

    def question(self, index: int) -> QA:
        if index >= len(self.qas):
            raise ConfigError(f"RULER {self.task} has {len(self.qas)} questions, fewer than the samples asked for")
        return self.qas[index]

    def min_units(self, index):
        return len(self.question(index).docs)

    def build(self, n, rng, index):
        qa = self.question(index)
        if n < len(self.docs):
            if n - len(qa.docs) > len(qa.more):
                taken = set(qa.docs + qa.more)
                others = [i for i in range(len(self.docs)) if i not in taken]
                chosen = qa.docs + qa.more + rng.sample(others, n - len(qa.docs) - len(qa.more))
            else:
                chosen = qa.docs + rng.sample(qa.more, n - len(qa.docs))
            docs = [self.docs[i] for i in chosen]
        else:
            docs = (self.docs * -(-n // len(self.docs)))[:n]
        rng.shuffle(docs)
        context = "\n\n".join(SPEC["document"].format(i=i + 1, document=d) for i, d in enumerate(docs))
        # one question at every length, and SQuAD's questions about one paragraph, share their documents
        return Prompt(self.prompt["template"], self.prompt["answer_prefix"],
                      {"context": context, "query": qa.query}, list(qa.answers), {"question": index},
                      cluster="documents-" + "-".join(map(str, sorted(qa.docs))))


def largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The largest n in [lo, hi] with fits(n) (binary search; fits is taken as monotone); None if
    none fits."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def size_haystack(tokens: Callable[[int], int], budget: int, lo: int, probe: int, cap: int | None = None) -> int | None:
    """RULER's search: estimate tokens per unit from a prompt of ``probe`` units, then the largest
    number of units (at most ``cap``) whose prompt has at most ``budget`` tokens, up to 3x the
    estimate; the bound doubles while it still fits (a large fixed part, such as vt's example,
    makes the estimate low)."""
    probe = max(probe, lo)
    if cap is not None:
        probe = min(probe, cap)
    hi = max(int(3 * budget * probe / tokens(probe)), 2 * probe)
    while (cap is None or hi < cap) and tokens(hi) <= budget:
        hi *= 2
    return largest_fitting(lambda n: tokens(n) <= budget, lo, hi if cap is None else min(hi, cap))


GENERATORS: dict[str, type[Generator]] = {
    "niah": Niah,
    "variable_tracking": VariableTracking,
    "common_words_extraction": CommonWords,
    "freq_words_extraction": FrequentWords,
    "qa": QuestionAnswering,
}


# ---------------------------------------------------------------------------------------------
# Prompt layout and token counts
# ---------------------------------------------------------------------------------------------

#: splits the chat-templated text where the user message's context ends
_MARK = "\x00kvbench-ruler\x00"


def adds_bos(tokenizer) -> bool:
    """Whether tokenizing with special tokens puts the BOS token first."""
    ids = tokenizer("", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def layout(tokenizer, chat: bool, context: str, query: str, answer_prefix: str, joiner: str = "") -> tuple[str, str]:
    """The (context, question) texts of a sample, which the runner tokenizes as they are (the
    context with the tokenizer's special tokens).

    Without a chat template the question is ``query + joiner + answer_prefix``. With one, the user
    message is context + query and the answer prefix follows the generation prompt; a BOS written
    by the template is dropped when the tokenizer adds its own, so there is one.
    """
    if not chat:
        return context, query + joiner + answer_prefix
    templated = tokenizer.apply_chat_template([{"role": "user", "content": context + _MARK}],
                                              add_generation_prompt=True, tokenize=False)
    head, closing = templated.split(_MARK)
    bos = tokenizer.bos_token
    if bos and head.startswith(bos) and adds_bos(tokenizer):
        head = head[len(bos):]
    return head, query + closing + answer_prefix


def prompt_tokens(tokenizer, context: str, question: str) -> int:
    """Prompt tokens as the runner encodes a sample without its own chat template."""
    return (len(tokenizer(context, add_special_tokens=True).input_ids)
            + len(tokenizer(question, add_special_tokens=False).input_ids))


# ---------------------------------------------------------------------------------------------
# kvpress's pre-generated set
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def kvpress_rows(length: int, kvpress_dir: str | None):
    """kvpress's RULER rows at one length, as a DataFrame (local copy or the hub)."""
    if kvpress_dir is not None:
        import pandas as pd

        folder = Path(kvpress_dir) / str(length)
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise ConfigError(f"no *.parquet file in {folder}: kvpress_dir must be a copy of the hub dataset "
                              f"{KVPRESS_HUB} (<kvpress_dir>/<length>/*.parquet, lengths {KVPRESS_LENGTHS})")
        df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        source = str(folder)
    else:
        try:
            from datasets import load_dataset

            df = load_dataset(KVPRESS_HUB, data_dir=str(length), split="test").to_pandas()
        except Exception as err:  # offline...
            raise ConfigError(f"could not load {KVPRESS_HUB} ({length}) from the Hugging Face hub "
                              f"({type(err).__name__}: {err}); without hub access, download the dataset "
                              "repository and pass task.kvpress_dir=<its folder>") from err
        source = f"{KVPRESS_HUB} {length}"
    missing = [c for c in KVPRESS_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{source} lacks column(s) {missing} of kvpress's RULER set {KVPRESS_COLUMNS}")
    df.attrs["source"] = source
    return df


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@register
class Ruler(Task):
    """The RULER suite; an instance with one task is a subtask (one results directory)."""

    kind = "ruler"
    Params = RulerParams
    main_metric = "score"

    def subtasks(self) -> list[Task]:
        return [Ruler(PREFIX + t, replace(self.params, tasks=[t])) for t in self.params.tasks]

    @property
    def task(self) -> str:
        """The RULER task name of a subtask."""
        if len(self.params.tasks) != 1:
            raise RuntimeError(f"'{self.name}' is a suite of {len(self.params.tasks)} tasks; use its subtasks()")
        return self.params.tasks[0]

    def check_data(self) -> None:
        """The local RULER data files the generated tasks read (read once: they are cached)."""
        p = self.params
        if p.source != "generate" or p.data_dir is None:
            return
        for kind in {needs(task) for task in p.tasks} - {None}:
            essay_words(p.data_dir) if kind == "essay" else qa_set(kind, p.data_dir)

    def samples(self, tokenizer, model_cfg) -> list[Sample]:
        p = self.params
        chat = p.template == "chat" and getattr(model_cfg, "chat_template", True) and bool(tokenizer.chat_template)
        if p.source == "kvpress":
            return [s for length in p.lengths for s in self.kvpress_samples(length, tokenizer, chat)]
        return [s for length in p.lengths for s in self.generate(length, tokenizer, chat)]

    def generate(self, length: int, tokenizer, chat: bool) -> list[Sample]:
        p = self.params

        def count(context: str, question: str) -> int:
            return prompt_tokens(tokenizer, context, question)

        gen = GENERATORS[SPEC["tasks"][self.task]["generator"]](self.task, p, length, count)
        budget = length - (gen.tokens_to_generate if gen.counts_generation else 0)

        def build(n: int, index: int) -> tuple[Prompt, str, str]:
            prompt = gen.build(n, random.Random(f"{p.seed}-{self.task}-{length}-{index}"), index)
            return (prompt, *layout(tokenizer, chat, *prompt.parts()))

        def tokens(n: int, index: int) -> int:
            return count(*build(n, index)[1:])

        cap = gen.max_units()
        most = size_haystack(lambda n: tokens(n, 0), budget, gen.min_units(0), gen.probe_units, cap)
        if most is not None and most == cap:
            raise ConfigError(f"RULER {self.task} at {length} tokens needs more than its {cap} words "
                              "(RULER then draws from its english_words.json, which kvbench does not ship)")
        out = []
        for index in range(p.samples_per_length):
            lo = gen.min_units(index)
            if most is not None and most >= lo and tokens(most, index) <= budget:
                n = most
            else:  # this sample's draw (or question) is longer: search below the first sample's size
                n = largest_fitting(lambda n: tokens(n, index) <= budget, lo, max(lo, (most or lo) - 1))
            if n is None:
                raise ConfigError(f"RULER {self.task}: a prompt of {lo} haystack unit(s) already exceeds "
                                  f"{budget} tokens; choose a longer length than {length}")
            prompt, context, question = build(n, index)
            out.append(Sample(
                id=f"{length}-{index}",
                context=context,
                question=question,
                answers=prompt.answers,
                max_new_tokens=gen.tokens_to_generate,
                meta={"length": length, "units": n, **prompt.meta},
                cluster=prompt.cluster,
            ))
        return out

    def kvpress_samples(self, length: int, tokenizer, chat: bool) -> list[Sample]:
        df = kvpress_rows(length, self.params.kvpress_dir)
        rows = df[df["task"] == self.task]
        if rows.empty:
            raise ConfigError(f"{df.attrs['source']} has no rows of task '{self.task}'; "
                              f"its tasks: {sorted(df['task'].unique())}")
        if self.params.samples_per_length is not None:
            rows = rows.iloc[: self.params.samples_per_length]
        bos = tokenizer.bos_token if tokenizer.bos_token and not chat and not adds_bos(tokenizer) else ""
        out = []
        for index, row in enumerate(rows.itertuples()):
            # kvpress's pipeline: the BOS text before a context without chat template, "\n" before
            # the answer prefix
            context, question = layout(tokenizer, chat, bos + row.context, row.question, row.answer_prefix, "\n")
            out.append(Sample(id=f"{length}-{index}", context=context, question=question,
                              answers=[str(a) for a in row.answer], max_new_tokens=int(row.max_new_tokens),
                              meta={"length": length}))
        return out

    def score(self, record: SampleRecord) -> dict[str, float]:
        """0..1 per sample (RULER's per-sample match); the task score is 100 x the mean."""
        return {"score": SAMPLE_SCORERS[metric_of(self.task)](record.pred, record.answers)}

    def summarize(self, records: list[SampleRecord]) -> dict[str, Any]:
        """RULER's score over all records and per length (``lengths``: {length: score})."""
        if not records:
            return {}
        scorer = TASK_SCORERS[metric_of(self.task)]

        def score(rs):
            return scorer([r.pred for r in rs], [r.answers for r in rs])

        by_length: dict[int, list[SampleRecord]] = {}
        for r in records:
            by_length.setdefault(r.meta["length"], []).append(r)
        return {"score": score(records), "lengths": {str(n): score(rs) for n, rs in sorted(by_length.items())}}

    @classmethod
    def tables(cls, runs: list[ReportRun]) -> dict[str, TaskTable]:
        """RULER's main table, a row per method and setting: the mean of its tasks' scores at each
        length (where every task of the row has that length), their plain and weighted means over
        lengths and the effective length (:func:`kvbench.scoring.ruler.effective_length`)."""
        rows: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
        for run in runs:
            per_length = {int(n): score for n, score in run.metrics.get("lengths", {}).items()}
            if per_length:
                rows.setdefault((run.method, run.setting), {})[run.task] = per_length
        if not rows:
            return {}
        lengths = sorted({n for tasks in rows.values() for per in tasks.values() for n in per})
        body = []
        for (method, setting), tasks in rows.items():
            means = {n: sum(per[n] for per in tasks.values()) / len(tasks)
                     for n in lengths if all(n in per for per in tasks.values())}
            effective = effective_length(means)
            shown = (f"<{min(means)}" if effective is None else f">{effective}" if effective == max(means)
                     else str(effective))
            averages = (sum(means.values()) / len(means), weighted_average(means, True), weighted_average(means, False))
            body.append([method, setting, str(len(tasks)), *(f"{means[n]:.2f}" if n in means else "n/a" for n in lengths),
                         *(f"{a:.2f}" for a in averages), shown])
        names = sorted({t for tasks in rows.values() for t in tasks}, key=lambda t: TASK_NAMES.index(base_task(t)))
        caption = (f"RULER's table: per method and setting, the mean score of its RULER tasks at each length "
                   f"(tokens), the mean over lengths (avg; wavg inc / dec: weights 1..k rising / falling with "
                   f"length, as RULER's wAvg) and the effective length, the longest length up to "
                   f"which every mean exceeds {EFFECTIVE_THRESHOLD} (Llama-2-7B's 4K score, RULER's threshold); "
                   f"\">N\": every length tested passes, \"<N\": the shortest does not. Tasks "
                   f"({len(names)}): {', '.join(names)}.")
        header = ["method", "setting", "tasks", *map(str, lengths), "avg", "wavg inc", "wavg dec", "effective length"]
        return {"RULER by length": TaskTable(caption, header, body)}

    def data_fingerprint(self) -> dict[str, Any] | None:
        """The local files a subtask reads: kvpress's parquet files of its lengths, or the data file
        its generator needs; None for data from the hub (or none at all)."""
        p = self.params
        if p.source == "kvpress":
            if p.kvpress_dir is None:
                return None
            folder = Path(p.kvpress_dir)
            names = [f.relative_to(folder).as_posix() for n in p.lengths for f in sorted((folder / str(n)).glob("*.parquet"))]
            return files_fingerprint(folder, names)
        kind = needs(self.task)
        if kind is None or p.data_dir is None:
            return None
        return files_fingerprint(p.data_dir, [DATA_FILES[kind]])

    @classmethod
    def store_configs(cls, config_store) -> None:
        """Register ``task=ruler`` (all 13) and ``task=ruler/<name>`` in Hydra's ConfigStore, generated
        from the task table and the parameter defaults; every parameter is present, so ``task.lengths``
        etc. can be overridden."""
        base = {"kind": cls.kind, **asdict(RulerParams()), "data_dir": "${data_dir}"}
        config_store.store(group="task", name="ruler", node={"name": "ruler", **base})
        for name in TASK_NAMES:
            config_store.store(group="task/ruler", name=name, node={**base, "name": PREFIX + name, "tasks": [name]})
