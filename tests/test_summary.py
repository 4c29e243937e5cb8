"""The end-of-sweep table, also for jobs that ran in other processes (Slurm, submitit)."""

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from conftest import run_info
from kvbench.results import RunDir, RunScores
from kvbench.summary import SweepSummary


def test_table_is_read_from_disk_when_jobs_ran_elsewhere(tmp_path, capsys):
    run = RunDir(tmp_path / "m" / "passkey" / "streaming" / "ratio-4")
    run.write_run(run_info({"name": "passkey", "kind": "passkey", "params": {}}, method="streaming", ratio=4,
                           label="ratio-4", n_expected=4, status="partial"))
    run.write_scores(RunScores(task="passkey", metric="exact_match", score=50.0, metrics={"exact_match": 50.0},
                               n=3, n_expected=4, complete=False, measured_ratio=3.98, tokens_held=128.0,
                               bytes_held=None, peak_bytes_held=None, decode_tokens_per_s=None))
    config = OmegaConf.create({"results_dir": str(tmp_path), "summary": True, "report": False})
    SweepSummary().on_multirun_end(config)  # no on_job_end in this process
    table = capsys.readouterr().out
    assert "streaming  ratio-4  exact_match  50.00  3/4  3.98x" in table


def test_a_failed_job_is_named_with_its_error(capsys):
    """Hydra hands a failed job's exception to on_job_end as its value (and re-raises it after the sweep)."""
    failed = JobReturn(overrides=["method=snapkv", "ratio=4"], status=JobStatus.FAILED,
                       _return_value=RuntimeError("out of memory"))
    SweepSummary().on_job_end(OmegaConf.create({}), failed)
    assert "job failed (method=snapkv ratio=4): RuntimeError: out of memory" in capsys.readouterr().err
