"""The end-of-sweep table, also for jobs that ran in other processes (Slurm, submitit)."""

from omegaconf import OmegaConf

from kvbench.results import RunDir
from kvbench.summary import SweepSummary


def test_table_is_read_from_disk_when_jobs_ran_elsewhere(tmp_path, capsys):
    run = RunDir(tmp_path / "m" / "passkey" / "streaming" / "ratio-4")
    run.write_run({"identity": {"model": {"name": "m"}, "method": {"name": "streaming"},
                                "compression": {"label": "ratio-4"}}})
    run.write_scores({"task": "passkey", "metric": "exact_match", "score": 50.0, "n": 3, "n_expected": 4,
                      "measured_ratio": 3.98, "tokens_held": 128.0})
    config = OmegaConf.create({"results_dir": str(tmp_path), "summary": True, "report": False})
    SweepSummary().on_multirun_end(config)  # no on_job_end in this process
    table = capsys.readouterr().out
    assert "streaming  ratio-4  exact_match  50.00  3/4  3.98x" in table
