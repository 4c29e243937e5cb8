"""Every row of docs/errors.md through the CLI (``python -m kvbench`` in a subprocess): exit status 2,
the documented message, no traceback, the existing results directory byte-identical afterwards and
nothing written outside results_dir. Every probe fails before the model loads; the probes run a few
at a time (each still pays the process's imports, ~7 s of CPU). Every bad name of every kind of
folder name is tried in-process (``test_names_never_leave_results_dir``)."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXISTING = ROOT / "tests/fixtures/results_v0"

EXAMPLE = {"input": "Question: Which ?\nType:", "context": "Question: Who ?\nType: Person", "answers": ["City"],
           "length": 9, "all_classes": ["City", "Person"], "_id": "a"}


def _line(**change) -> str:
    return json.dumps({**EXAMPLE, **change})


#: task data folders, one error each: {folder: {file: bytes}}
DATA = {
    "not_utf8": {"trec.jsonl": (_line() + "\n").encode() + b'{"input": "\xff"}\n'},
    "bad_json": {"trec.jsonl": (_line() + "\n" + '{"input": "x",\n').encode()},
    "no_answers": {"trec.jsonl": (_line() + "\n" + json.dumps({k: v for k, v in EXAMPLE.items() if k != "answers"})
                                  + "\n").encode()},
    "length_str": {"trec.jsonl": (_line() + "\n" + _line(_id="b", length="9") + "\n").encode()},
    "duplicate": {"trec.jsonl": (_line() + "\n\n" + _line(_id="b") + "\n" + _line(_id="b") + "\n").encode()},
    "gsm8k": {"test.jsonl": b'{"question": "1 + 1?", "solution": "#### 2"}\n'},
    "essay": {"PaulGrahamEssays.json": b'{"text": "an essay",\n "more": }\n'},
}

NAME = "expected a folder name inside results_dir: not empty, not '.' or '..', with no '/', '\\' or control characters"
TASK_NAME = ("expected folder names separated by '/' inside results_dir, each not empty, not '.' or '..', "
             "with no '\\' or control characters")

#: (row, overrides, message); {file} is a regular file, {data} the data folders, {tmp} the test's folder
ROWS = [
    ("method parameter type", "method=streaming method.sink_tokens=abc",
     "streaming.sink_tokens='abc': expected an integer >= 0"),
    ("string for a boolean", "method=mikv method.balancer=maybe", "mikv.balancer='maybe': expected true or false"),
    ("outside the choices", "method=quant method.bits=3", "quant.bits=3: expected one of 2, 4, 8, or null"),
    ("unknown method parameter", "method=streaming +method.sinks=2",
     "unknown streaming parameter 'sinks' (did you mean 'sink_tokens'?); valid: sink_tokens"),
    ("unknown method", "method=streming",
     "unknown method 'streming' (did you mean 'streaming'?); valid: adakv, bounded, cake"),
    ("task parameter type", "task.key_digits=abc", "passkey.key_digits='abc': expected an integer >= 1"),
    ("repeated list element", "task.lengths=[512,512]",
     "passkey.lengths=[512, 512]: expected a non-empty list of distinct integers >= 1"),
    ("top-level type", "ratio=abc", "ratio='abc': expected a number >= 1, or null"),
    ("top-level range", "limit=0", "limit=0: expected an integer >= 1, or null"),
    ("infeasible budget", "method=lagkv ratio=null budget=32",
     "the smallest feasible budget is sink_tokens + 2 x lag_size - 1 = 2063"),
    ("budget refused", "method=quant ratio=null budget=32", "quant takes no budget: it keeps every token"),
    ("unknown top-level key", "ratoi=2", "unknown config key 'ratoi' (did you mean 'ratio'?); valid: budget"),
    ("model key type", "model.max_prompt_tokens=many", "model.max_prompt_tokens='many': expected an integer"),
    ("unknown device", "model.device=gpu0", "device must be 'auto' or a torch device (cpu, cuda, cuda:1, mps, ...), "
                                            "got 'gpu0'"),
    ("model name ..", "model.name=../../escaped_model", f"model.name='../../escaped_model': {NAME}"),
    ("task name absolute", "task.name=/abs/path", f"task.name='/abs/path': {TASK_NAME}"),
    ("method name ..", "method.name=../escaped_method", "unknown method '../escaped_method'; valid: adakv, bounded"),
    ("results_dir a file", "results_dir={file}", "results_dir='{file}': {file} is a file, not a folder"),
    ("missing local model", "model.source=path model.path={tmp}/nonexistent/model model.gguf_file=null",
     "model 'smollm2-135m': no model at {tmp}/nonexistent/model: expected a folder with config.json"),
    ("not UTF-8", "task=longbench/trec data_dir={data}/not_utf8",
     "{data}/not_utf8/trec.jsonl:2: not UTF-8 text (invalid start byte: byte 0xff)"),
    ("malformed JSON", "task=longbench/trec data_dir={data}/bad_json", "{data}/bad_json/trec.jsonl:2: malformed JSON line"),
    ("missing field", "task=longbench/trec data_dir={data}/no_answers",
     "{data}/no_answers/trec.jsonl:2: missing field 'answers'"),
    ("wrong field type", "task=longbench/trec data_dir={data}/length_str",
     "{data}/length_str/trec.jsonl:2: field 'length' has type str"),
    ("duplicate id", "task=longbench/trec data_dir={data}/duplicate",
     "{data}/duplicate/trec.jsonl:4: duplicate sample id 'b' in {data}/duplicate/trec.jsonl "
     "(first at {data}/duplicate/trec.jsonl:3)"),
    ("math missing field", "task=gsm8k task.data_dir={data}/gsm8k", "{data}/gsm8k/test.jsonl:1: missing field 'answer'"),
    ("RULER malformed JSON", "task=ruler/niah_single_2 data_dir={data}/essay",
     "{data}/essay/PaulGrahamEssays.json:2: malformed JSON: Expecting value"),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but Hydra's job folders, by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).as_posix().startswith("_hydra/")}


def probe(base: Path, row: str, overrides: str) -> dict:
    """Run one row in its own folder: ``home/results`` (a copy of existing results), cwd ``home``."""
    tmp = base / row.replace(" ", "_")
    home, data = tmp / "home", base / "data"
    results = home / "results"
    shutil.copytree(EXISTING, results)
    (tmp / "file").write_text("a file, not a folder")
    places = {"file": str(tmp / "file"), "data": str(data), "tmp": str(tmp)}
    args = [a.format(**places) for a in overrides.split(" ")]
    if not any(a.startswith("results_dir=") for a in args):
        args.append(f"results_dir={results}")
    before = snapshot(results)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run([sys.executable, "-m", "kvbench", *args], cwd=home, env=env, capture_output=True,
                         text=True, timeout=300)
    outside = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                     if not (p == home or p == results or results in p.parents or p.name == "file"))
    return {"out": out, "places": places, "same": snapshot(results) == before, "outside": outside}


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    base = tmp_path_factory.mktemp("errors")
    for folder, files in DATA.items():
        for name, content in files.items():
            (base / "data" / folder).mkdir(parents=True, exist_ok=True)
            (base / "data" / folder / name).write_bytes(content)
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {row: pool.submit(probe, base, row, overrides) for row, overrides, _ in ROWS}
        return {row: future.result() for row, future in futures.items()}


@pytest.mark.parametrize("row,overrides,message", ROWS, ids=[row for row, _, _ in ROWS])
def test_bad_input_exits_2_with_its_message_and_touches_nothing(probes, row, overrides, message):
    result = probes[row]
    out = result["out"]
    assert out.returncode == 2, out.stderr[-2000:]
    assert message.format(**result["places"]) in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert "loading model" not in out.stderr + out.stdout
    assert result["same"], "the existing results directory changed"
    assert result["outside"] == [], "written outside results_dir"


def test_every_row_is_documented():
    table = (ROOT / "docs/errors.md").read_text()
    for _, overrides, _ in ROWS:
        documented = overrides.replace("{data}/", "").split(" ")[0].split("{")[0]
        assert f"`{documented}" in table or documented in table, overrides


def test_debug_shows_the_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvbench", "--debug", "ratio=abc", f"results_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError: ratio='abc'" in out.stderr


BAD_NAMES = ["..", "../escaped", "/abs/path", "a/b", "a\\b", "", ".", "a\nb"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_never_leave_results_dir(tmp_path, name):
    """model, task, method and setting names: '..', absolute paths, separators and empty names are
    refused before anything is written (a task name may nest folders with '/', as ``ruler/vt``)."""
    from kvbench import runner
    from kvbench.config import check_folder_name, check_overrides, load_config
    from kvbench.errors import ConfigError

    base = {"model": {"name": "m", "source": "hub", "path": "m"}, "method": {"name": "streaming"},
            "task": {"name": "passkey", "kind": "passkey"}, "ratio": 2, "results_dir": str(tmp_path)}
    if name.isprintable():  # a newline cannot be typed as one override
        with pytest.raises(ConfigError, match="^model.name=.*: expected a folder name inside results_dir"):
            check_overrides([f"model.name={name}"])
    with pytest.raises(ConfigError, match="^model.name=.*: expected a folder name inside results_dir"):
        runner.RunSpec.from_config(load_config({**base, "model": {**base["model"], "name": name}}))
    with pytest.raises(ConfigError, match="^unknown method"):
        runner.RunSpec.from_config(load_config({**base, "method": {"name": name}}))
    with pytest.raises(ConfigError, match="^setting=.*: expected a folder name inside results_dir"):
        check_folder_name("setting", f"ratio-2_x-{name}" if name not in ("", ".", "..") else name)
    if name != "a/b":  # a task name nests folders: ruler/vt
        with pytest.raises(ConfigError, match="^task.name=.*: expected folder names separated by '/'"):
            runner.RunSpec.from_config(load_config({**base, "task": {**base["task"], "name": name}}))
    assert list(tmp_path.iterdir()) == []


def test_data_errors_name_the_file_and_line(tmp_path):
    from kvbench.errors import DataError
    from kvbench.tasks.base import read_json, read_jsonl, unique_ids

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b'{"a": 1}\n\n{"a": "caf\xe9"}\n')  # latin-1, line 3
    with pytest.raises(DataError, match=rf"^{jsonl}:3: not UTF-8 text \(invalid continuation byte: byte 0xe9\)$"):
        list(read_jsonl(jsonl))
    whole = tmp_path / "data.json"
    whole.write_bytes(b'{\n "a": 1,\n "b": "\xff"\n}')
    with pytest.raises(DataError, match=rf"^{whole}:3: not UTF-8 text"):
        read_json(whole)
    whole.write_bytes(b'{\n "a": 1,\n "b": \n}')
    with pytest.raises(DataError, match=rf"^{whole}:4: malformed JSON: Expecting value \(column 1\)$"):
        read_json(whole)
    with pytest.raises(DataError, match=r"^f:9: duplicate sample id 'x' in f \(first at f:2\)$"):
        unique_ids([("f:2", "x"), ("f:5", "y"), ("f:9", "x")], "f")


@pytest.mark.parametrize("value,checked,message", [
    (512, [512], None),  # a single value is a one-element list
    ([512, 1024], [512, 1024], None),
    ([], None, r"^passkey.lengths=\[\]: expected a non-empty list of distinct integers >= 1$"),
    ([512, 0], None, r"^passkey.lengths=\[512, 0\]: expected a non-empty list of distinct integers >= 1$"),
    ([0.5, 0.5], None, r"^passkey.depths=\[0.5, 0.5\]: expected a non-empty list of distinct numbers in \[0, 1\]$"),
    (["512"], None, r"^passkey.lengths=\['512'\]: expected a non-empty list of distinct integers >= 1$"),
])
def test_list_parameters(value, checked, message):
    from kvbench.errors import ConfigError
    from kvbench.tasks.passkey import Passkey

    key = "depths" if message and "depths" in message else "lengths"
    if message is None:
        assert getattr(Passkey.parse_params({key: value}), key) == checked
    else:
        with pytest.raises(ConfigError, match=message):
            Passkey.parse_params({key: value})


@pytest.mark.parametrize("override,message", [
    ("summary=-1", "^summary=-1: expected true or false$"),  # OmegaConf alone would read -1 as true
    ("model.chat_template=yes", "^model.chat_template='yes': expected true or false$"),
    ("ratio=inf", r"^ratio=inf: expected a number >= 1, or null$"),
    ("ratio=2,0.5", r"^ratio=0.5: expected a number >= 1, or null$"),  # every value of a sweep
    ("seed=4.5", "^seed=4.5: expected an integer$"),
])
def test_command_line_values_are_checked_before_hydra(override, message):
    from kvbench.config import check_overrides
    from kvbench.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        check_overrides([override])
    check_overrides(["ratio=2,4", "seed=range(0,3)", "model.name=smollm2", "results_dir=somewhere"])
