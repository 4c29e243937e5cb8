"""The results table printed on the terminal when a run or a sweep ends, and the regenerated report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

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


class SweepSummary(Callback):
    """Collects what each job returned and prints one table at the end (jobs of a sweep that point at
    the same results directory, such as ``full`` crossed with several ratios, appear once)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        value = getattr(job_return, "_return_value", None)
        for row in value or []:
            self.rows[row["dir"]] = row

    def _print(self, config) -> None:
        if self.rows and config.get("summary", True):
            print("\n" + format_table(list(self.rows.values())), flush=True)

    def _report(self, config) -> None:
        """Regenerate the leaderboards of the results directory. The results are already on disk, so a
        reporting error is only a warning: it must never turn a finished sweep into a failed one."""
        if not self.rows or not config.get("report", True):  # no job finished: nothing new to report
            return
        try:
            from kvbench.report import INDEX, write_report  # pandas and matplotlib only when reporting

            written = write_report(Path(config.results_dir))
            print(f"report: {next(p for p in written if p.name == INDEX)}", flush=True)
        except Exception:
            log.warning("could not regenerate the report of %s (results are kept; rerun "
                        "`python -m kvbench.report %s`)", config.results_dir, config.results_dir, exc_info=True)

    def on_run_end(self, config, **kwargs: Any) -> None:
        self._print(config)
        self._report(config)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        self._print(config)
        self._report(config)
