"""The report's generation columns: mean output length, its change against the full cache, and the
time per correct answer, from the records."""

from conftest import run_info, sample_record
from kvbench import report
from kvbench.results import RunDir
from kvbench.runner import summarize_run
from kvbench.tasks import task_from_identity

TASK = {"name": "decode_recall", "kind": "decode_recall", "params": {"count_to": [40], "samples": 2, "seed": 0,
                                                                        "max_new_tokens": 400, "answer_tokens": 4,
                                                                        "compress": "whole"}}


def write(root, method, budget, outputs):
    """A complete run whose records have (new tokens, seconds, recalled) ``outputs``."""
    label = f"budget-{budget}" if budget else "ratio-1"
    run = RunDir(root / "m" / "decode_recall" / method / label)
    run.write_run(run_info(TASK, method=method, ratio=None if budget else 1, budget=budget, label=label,
                           n_expected=len(outputs)))
    for i, (tokens, seconds, score) in enumerate(outputs):
        run.append(sample_record(f"s{i}", task="decode_recall", new_tokens=tokens, prefill_s=1.0,
                                 decode_s=seconds - 1.0, scores={"recalled": score, "counted": 1.0}))
    run.write_scores(summarize_run(task_from_identity(TASK), run.records(), len(outputs)))


def test_output_length_against_full_and_time_per_correct_answer(tmp_path):
    write(tmp_path, "full", None, [(100, 4.0, 1.0), (120, 4.0, 1.0)])
    write(tmp_path, "h2o", 64, [(150, 5.0, 1.0), (130, 5.0, 0.0)])
    df = report.collect(tmp_path)
    full, h2o = (df[df.method == m].iloc[0] for m in ("full", "h2o"))
    assert (full.mean_new_tokens, h2o.mean_new_tokens) == (110, 140)
    assert h2o.new_tokens_vs_full == 100 * (140 / 110 - 1) and full.new_tokens_vs_full == 0
    assert (full.s_per_correct, h2o.s_per_correct) == (4.0, 10.0)  # 8 s for 2 correct; 10 s for 1
    page = report.leaderboard_markdown(df, "m")
    assert "| h2o | budget 64 | 50.0 | 140.0 | +27.3% | 10.00 |" in page
