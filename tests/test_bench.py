"""The method-cost benchmark (scripts/bench_methods.py): its measurements, its summary against the
full cache, its verdicts on the targets, and a real run on the embedded model."""

import json

import pandas as pd
import pytest

from conftest import random_prompt
from kvbench import bench
from kvbench.errors import ConfigError
from kvbench.report import write_report


def test_measure_reports_what_the_cache_held(tiny_llama):
    row = bench.measure(tiny_llama, "streaming", 4.0, random_prompt(40), new_tokens=5)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head_dim x fp32 bytes
    assert row["measured_ratio"] == pytest.approx(4.0)
    assert row["kv_bytes_after_prefill"] == 10 * per_token
    assert row["peak_kv_bytes"] == 40 * per_token  # the whole prompt is held while it is prefilled
    assert row["prompt_tokens"] == 40 and row["ratio"] == 4.0
    assert row["sample_s"] >= row["prefill_s"] >= row["compress_s"] > 0


def test_full_is_measured_without_a_ratio(tiny_llama):
    row = bench.measure(tiny_llama, "full", None, random_prompt(40), new_tokens=3)
    assert row["ratio"] == 1.0 and row["measured_ratio"] == 1.0


def raw_rows():
    rows = []
    for repeat, (full, stream, h2o) in enumerate([(10.0, 10.2, 12.0), (12.0, 12.1, 13.0), (11.0, 13.0, 12.5)]):
        for method, ratio, sample in (("full", 1.0, full), ("streaming", 8.0, stream), ("h2o", 8.0, h2o)):
            rows.append({"repeat": repeat, "length": 4096, "method": method, "ratio": ratio, "prompt_tokens": 4100,
                         "prefill_s": sample / 2, "compress_s": 0.01, "decode_ms_per_token": 60.0 if method == "full" else 45.0,
                         "sample_s": sample, "measured_ratio": ratio, "kv_bytes_after_prefill": 100 / ratio,
                         "peak_kv_bytes": 200.0, "peak_process_bytes": 400.0 + repeat})
    return pd.DataFrame(rows)


def test_summary_takes_medians_and_divides_by_full_at_the_same_length():
    table = bench.summarize(raw_rows()).set_index("method")
    assert table.loc["full", "sample_s"] == 11.0 and table.loc["streaming", "sample_s"] == 12.1
    assert table.loc["streaming", "sample_vs_full"] == pytest.approx(12.1 / 11.0)
    assert table.loc["h2o", "sample_vs_full"] == pytest.approx(12.5 / 11.0)
    assert table.loc["h2o", "decode_vs_full"] == pytest.approx(0.75)
    assert table.loc["full", "peak_process_bytes"] == 401.0 and table.loc["full", "repeats"] == 3


def test_targets_are_judged_as_the_issue_states_them():
    table = bench.summarize(raw_rows())
    sweeps = bench.sweep_summary(pd.DataFrame([
        {"repeat": 0, "method": "streaming", "ratios": 4, "prompt_tokens": 4100, "one_ratio_s": 10.0, "sweep_s": 15.0},
        {"repeat": 0, "method": "lagkv", "ratios": 4, "prompt_tokens": 4100, "one_ratio_s": 10.0, "sweep_s": 17.0},
    ]))
    lines = "\n".join(bench.target_lines(table, sweeps))
    assert "`streaming`: +10.0% time per sample vs full at 4100 tokens, worst ratio (target +5%): MISSED" in lines
    assert "`h2o`: +13.6% time per sample vs full at 4100 tokens, worst ratio (target +15%): met" in lines
    assert "`streaming`: 1.50x one ratio's run (target <= 1.6x): met" in lines
    assert "`lagkv`: 1.70x one ratio's run (target <= 1.6x): MISSED" in lines
    assert "decode step of `h2o` at ratio 8: 0.75x full's (target < 1): met" in lines


def test_bad_arguments_fail_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="h2o"):
        bench.main(["--methods", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not share its prefill.*streaming"):
        bench.main(["--sweep-methods", "full", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse's usage error, naming both options
        bench.main(["--repeats", "0", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown lagkv parameter 'lagsize' .did you mean 'lag_size'.*sink_tokens"):
        bench.main(["--param", "lagkv.lagsize=128", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="lag_size"):  # the method's own bounds, as in the main CLI
        bench.main(["--param", "lagkv.lag_size=0", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown method 'lagk' .did you mean 'lagkv'"):
        bench.main(["--param", "lagk.lag_size=128", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="(?s)Could not find 'model/nope'.*smollm2-135m"):
        bench.main(["--model", "nope", "--methods", "streaming", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="expected method.key=value"):
        bench.main(["--param", "lagkv", "--out", str(tmp_path)])


def test_method_parameters_reach_the_measured_cache(tiny_llama):
    # the config's defaults, with --param applied as the main CLI's method.<key>=<value>
    assert bench.method_params(["lagkv.lag_size=8", "lagkv.sink_tokens=0"], ["full"]) == {
        "full": {}, "lagkv": {"lag_size": 8, "sink_tokens": 0, "score_v_ratio": 1.0}}
    prompt = random_prompt(40)
    # lag 8, no sink, 40 tokens: 5 partitions, the 4 scored ones keep 8 / 4 = 2 tokens, the last 8 stay
    row = bench.measure(tiny_llama, "lagkv", 4.0, prompt, new_tokens=2, params={"lag_size": 8, "sink_tokens": 0})
    assert row["measured_ratio"] == pytest.approx(40 / (4 * 2 + 8))
    default = bench.measure(tiny_llama, "lagkv", 4.0, prompt, new_tokens=2)  # lag 1024: nothing to compress
    assert default["measured_ratio"] == 1.0


def test_a_chunked_prefill_lowers_the_peak_kv_in_a_step(tiny_llama):
    prompt = random_prompt(200)
    one_step = bench.measure(tiny_llama, "streaming", 4.0, prompt, new_tokens=3)
    chunked = bench.measure(tiny_llama, "streaming", 4.0, prompt, new_tokens=3, prefill_chunk=32)
    token = 2 * 2 * 2 * 16 * 4  # key + value, 2 KV heads x 16 channels in float32, 2 layers
    # capacity round(200 / 4) = 50: the whole prompt in one step; with chunks at most 50 + 32
    assert (one_step["peak_kv_bytes"], chunked["peak_kv_bytes"]) == (200 * token, 82 * token)
    raw = pd.DataFrame([{"length": 200, "repeat": 0, "prefill_chunk": 32, **chunked}])
    table = bench.summarize(pd.DataFrame([{"length": 200, "repeat": 0, **one_step},
                                          {"length": 200, "repeat": 0, **bench.measure(tiny_llama, "full", None, prompt, 3)}]))
    row = bench.chunk_summary(table, raw).iloc[0]
    assert (row.peak_kv_bytes, row.chunked_peak_kv_bytes) == (200 * token, 82 * token)
    assert "| 200 | streaming | 4 | 32 |" in "\n".join(bench.chunk_markdown(bench.chunk_summary(table, raw)))


def test_a_real_run_writes_tables_and_the_report_links_them(embedded, tmp_path):
    out = tmp_path / "results" / "bench"
    assert bench.main(["--methods", "streaming", "--ratios", "2", "--lengths", "96", "--new-tokens", "3",
                       "--repeats", "1", "--sweep-methods", "streaming", "--sweep-ratios", "2,4",
                       "--out", str(out)]) == 0
    table = pd.read_csv(out / "bench_methods.csv").set_index("method")
    assert list(table.index) == ["full", "streaming"]
    assert table.loc["streaming", "measured_ratio"] == pytest.approx(2, rel=0.02)
    assert table.loc["full", "sample_vs_full"] == 1.0
    assert len(pd.read_csv(out / "bench_sweep.csv")) == 1
    page = (out / "bench_methods.md").read_text()
    assert "| streaming | 2 |" in page and "## Targets" in page and "sweep over 2 ratios" in page
    assert "## Chunked prefill" in page and len(pd.read_csv(out / "bench_chunked.csv")) == 2  # full, streaming
    assert json.loads((out / "machine.json").read_text())["device"] == "cpu"
    write_report(tmp_path / "results", formats=["md"])
    assert "(bench/bench_methods.md)" in (tmp_path / "results" / "LEADERBOARD.md").read_text()
