"""The results table printed on the terminal when a run or a sweep ends, and the regenerated report."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback

from kvbench.results import RunDir, find_runs

log = logging.getLogger(__name__)


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of run summaries (one row per results directory)."""
    headers = ["model", "task", "method", "setting", "metric", "score", "n", "measured ratio", "tokens held"]
    lines = []
    for r in rows:
        lines.append([
            r["model"], r["task"], r["method"], r["setting"], r["metric"],
            "n/a" if r["score"] is None else f"{r['score']:.2f}",
            f"{r['n']}/{r['n_expected']}",
            "n/a" if r["measured_ratio"] is None else f"{r['measured_ratio']:.2f}x",
            "n/a" if r["tokens_held"] is None else f"{r['tokens_held']:.0f}",
        ])
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row) for row in lines]
    return "\n".join(out)


def row_from_disk(run: RunDir) -> dict:
    """A table row (the shape ``runner.run_task`` returns) from a results directory's files."""
    identity = run.read_run().identity
    return {"dir": str(run.path), "model": identity.model["name"], "method": identity.method["name"],
            "setting": identity.compression["label"], **run.read_scores().to_json()}


class SweepSummary(Callback):
    """Collects what each job returned and prints one table at the end (jobs of a sweep that point at
    the same results directory, such as ``full`` crossed with several ratios, appear once)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        value = getattr(job_return, "_return_value", None)
        if job_return.status == JobStatus.FAILED:
            # Hydra holds the exception as the job's value, and re-raises the first failure once the
            # sweep's jobs are done, skipping on_multirun_end: name the job and its error now
            print(f"kvbench: job failed ({' '.join(job_return.overrides or [])}): "
                  f"{type(value).__name__}: {value}", file=sys.stderr, flush=True)
            return
        for row in value or []:
            self.rows[row["dir"]] = row

    def _rows(self, config) -> list[dict]:
        """This process's jobs; jobs that ran elsewhere (Slurm, submitit's local executor) call
        ``on_job_end`` in their own process, so their rows are read back from the results tree."""
        if self.rows:
            return list(self.rows.values())
        return [row_from_disk(run) for run in find_runs(Path(config.results_dir)) if run.read_scores() is not None]

    def _print(self, rows: list[dict], config) -> None:
        if rows and config.summary:
            print("\n" + format_table(rows), flush=True)

    def _report(self, rows: list[dict], config) -> None:
        """Regenerate the leaderboards of the results directory. The results are already on disk, so a
        reporting error is only a warning: it must never turn a finished sweep into a failed one."""
        if not rows or not config.report:  # no job finished: nothing new to report
            return
        try:
            from kvbench.report import INDEX, write_report  # pandas and matplotlib only when reporting

            written = write_report(Path(config.results_dir))
            print(f"report: {next(p for p in written if p.name == INDEX)}", flush=True)
        except Exception:
            log.warning("could not regenerate the report of %s (results are kept; rerun "
                        "`python -m kvbench.report %s`)", config.results_dir, config.results_dir, exc_info=True)

    def _end(self, config) -> None:
        rows = self._rows(config)
        self._print(rows, config)
        self._report(rows, config)

    def on_run_end(self, config, **kwargs: Any) -> None:
        self._end(config)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        self._end(config)
