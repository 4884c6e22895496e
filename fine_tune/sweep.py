"""Multirun bookkeeping: per-job status files, resumable sweeps, failure tolerance, sweep summary.

Why this exists: a Hydra sweep of N fine-tuning jobs takes hours, and out of the box one failing
job (an OOM at r=64, a typo'd path) aborts the remaining ones, a rerun redoes the finished ones,
and the only overview is scrolling logs. Here:
- each job dir carries `status.json` (contract in docs/contracts.md), written atomically, with
  `finished` written last, so "is this job done?" is one file read, also for a crashed process;
- `should_skip()` lets a rerun into the same sweep dir skip finished jobs (job dirs are named by
  their overrides, so the same job lands in the same dir);
- `SweepCallback` records failures that escape the job, keeps the sweep going, prints and writes a
  summary at the end, and makes the process exit non-zero only when no job finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import sys
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fine_tune.hardware import is_main_process
from fine_tune.tracking.redact import redact, redact_override, redact_text
from fine_tune.utils.format import finite_number
from fine_tune.utils.io import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
FINISHED = "finished"
RUNNING = "running"
FAILED = "failed"
OOM = "oom"
PREEMPTED = "preempted"
_MAX_ERROR = 4000  # characters of an error kept in status.json (the full traceback is in the job log)
_MAX_SUBDIR = 200  # below the 255-byte file-name limit of common file systems


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The job's status.json, or None when absent or unreadable (a dir without it never finished)."""
    data = read_json(Path(run_dir) / STATUS_FILE)
    return data if isinstance(data, dict) else None


def should_skip(run_dir: str | os.PathLike) -> bool:
    """True when this job dir holds a finished run, so a rerun of the sweep need not train it again."""
    status = read_status(run_dir)
    return bool(status) and status.get("status") == FINISHED


def finished_metric(run_dir: str | os.PathLike) -> float | None:
    """What a skipped job returns to the sweeper: status.json's metric, else metrics.json's eval_loss.

    Optuna needs a value for every trial, including those a resumed sweep skips.
    """
    status = read_status(run_dir) or {}
    metric = finite_number(status.get("metric"))
    if metric is None:
        metric = finite_number((read_json(Path(run_dir) / "metrics.json") or {}).get("eval_loss"))
    return metric


def _write(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    previous = read_status(run_dir) or {}
    status = {
        "status": previous.get("status"),
        "error": None,
        "overrides": previous.get("overrides") or [],
        "started": previous.get("started"),
        "ended": None,
        "metric": None,
    }
    status.update(fields)
    status["overrides"] = [redact_override(str(o)) for o in status["overrides"]]
    if is_main_process():  # under torchrun every rank runs the job; one writes its status
        atomic_write_json(Path(run_dir) / STATUS_FILE, status)
    return status


def mark_running(run_dir: str | os.PathLike, overrides: Sequence[str]) -> dict[str, Any]:
    """Record that the job started (again): clears a previous failure, keeps nothing stale."""
    return _write(run_dir, status=RUNNING, overrides=list(overrides), started=_now())


def mark_finished(run_dir: str | os.PathLike, metric: Any = None) -> dict[str, Any]:
    """Record success; call last, after metrics.json and the adapter are written."""
    return _write(run_dir, status=FINISHED, ended=_now(), metric=finite_number(metric))


def is_oom(error: BaseException | str) -> bool:
    """True for CUDA / MPS / host out-of-memory errors, which get their own status (`oom`)."""
    if isinstance(error, MemoryError):
        return True
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    text = str(error).lower()
    return name == "OutOfMemoryError" or "out of memory" in text or "cuda_error_out_of_memory" in text


def _error_text(error: BaseException | str | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, BaseException):
        message = str(error).strip()
        error = f"{type(error).__name__}: {message}" if message else type(error).__name__
    text = redact_text(str(error))
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


def mark_failed(
    run_dir: str | os.PathLike, error: BaseException | str | None, oom: bool = False
) -> dict[str, Any]:
    """Record a failure (status `oom` when `oom`), so the summary and a rerun know to retry it."""
    return _write(run_dir, status=OOM if oom else FAILED, error=_error_text(error), ended=_now())


def mark_preempted(run_dir: str | os.PathLike, error: BaseException | str | None = None) -> dict[str, Any]:
    """Record a clean stop on SIGTERM/SIGINT; a rerun (or SLURM requeue) resumes the job."""
    return _write(run_dir, status=PREEMPTED, error=_error_text(error), ended=_now())


def job_subdir(override_dirname: Any, num: Any = None) -> str:
    """A job's directory name inside the sweep dir: its overrides, made safe for a file name.

    Deterministic in the overrides (never the job number unless there are no overrides), so a
    rerun into the same sweep dir finds each job's earlier output. `/` in values (paths) would
    nest directories and very long names exceed the file-name limit: both are rewritten, the
    latter keeping a hash so names stay unique.
    """
    text = str(override_dirname or "").replace(os.sep, "_").replace("/", "_").strip()
    if not text or text in (".", ".."):
        return f"job{num}" if num not in (None, "") else "job"
    if len(text.encode()) > _MAX_SUBDIR:
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        text = text.encode()[: _MAX_SUBDIR - 11].decode(errors="ignore") + "-" + digest
    return text


# `${fine_tune.job_subdir:${hydra.job.override_dirname},${hydra.job.num}}` in hydra.sweep.subdir.
if not OmegaConf.has_resolver("fine_tune.job_subdir"):
    OmegaConf.register_new_resolver("fine_tune.job_subdir", job_subdir)


def summarize(sweep_dir: str | os.PathLike, metric: str = "eval_loss") -> dict[str, Any]:
    """Status of every job under `sweep_dir`: rows sorted finished-best-first, plus counts."""
    from fine_tune.compare import differing_overrides, load_jobs
    from fine_tune.tracking.base import run_name, split_override

    jobs = load_jobs([Path(sweep_dir)], missing_ok=True)
    differ, _common = differing_overrides(jobs)
    rows = []
    for job in jobs:
        varied = [o for o in job.overrides if split_override(o)[0] in differ]
        rows.append(
            {
                "job": job.name,
                "label": run_name(varied, fallback=job.name) or job.name,
                "overrides": ",".join(job.overrides),
                "status": job.state,
                metric: job.value(metric),
                "error": (job.status or {}).get("error"),
                "dir": str(job.path),
            }
        )
    rows.sort(key=lambda r: (r["status"] != FINISHED, r[metric] is None, r[metric] or 0.0, r["job"]))
    counts = dict(Counter(row["status"] for row in rows))
    summary: dict[str, Any] = {"sweep_dir": str(sweep_dir), "metric": metric, "counts": counts, "jobs": rows}
    optuna = Path(sweep_dir) / "optimization_results.yaml"
    if optuna.is_file():
        with contextlib.suppress(Exception):
            summary["optuna"] = OmegaConf.to_container(OmegaConf.load(optuna))
    return redact(summary)


def format_summary(summary: dict[str, Any], markdown: bool = False) -> str:
    """The end-of-sweep table (job, overrides, status, metric) as text or Markdown."""
    from fine_tune.compare import markdown_table, text_table
    from fine_tune.utils.format import format_metric

    metric = summary["metric"]
    headers = ["job", "status", metric, "error"]  # job = the overrides that differ between jobs
    body = []
    for row in summary["jobs"]:
        error = (row.get("error") or "").splitlines()[0][:80] if row.get("error") else ""
        body.append(
            [row.get("label") or row["job"], row["status"], format_metric(metric, row[metric]), error]
        )
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items())) or "no jobs"
    title = f"Sweep {summary['sweep_dir']}: {counts}"
    table = markdown_table(headers, body) if markdown else text_table(headers, body)
    text = (f"# {title}\n\n" if markdown else f"{title}\n") + table
    optuna = summary.get("optuna")
    if optuna and "best_params" in optuna:
        best = ", ".join(f"{k}={v}" for k, v in optuna["best_params"].items())
        text += f"\n\nOptuna best: {best} -> {optuna.get('best_value')}"
    return text + "\n"


def write_summary(sweep_dir: str | os.PathLike, metric: str = "eval_loss") -> dict[str, Any]:
    """Write sweep_summary.{md,json} into the sweep dir and return the summary."""
    summary = summarize(sweep_dir, metric)
    atomic_write_json(Path(sweep_dir) / "sweep_summary.json", summary)
    atomic_write_text(Path(sweep_dir) / "sweep_summary.md", format_summary(summary, markdown=True))
    return summary


class SweepCallback(Callback):
    """Hydra callback (hydra.callbacks) that keeps multiruns going and reports how they went.

    - on_job_end: an exception that escaped the job is written to its status.json (`failed` or
      `oom`) with the traceback in the job log; with the basic sweeper the job is then reported to
      Hydra as completed, because Hydra 1.3's BasicSweeper aborts the whole sweep on the first
      failed job. Other sweepers keep the failure (Optuna records it as a failed trial and goes on
      while its `max_failure_rate` allows).
    - on_multirun_end: prints the summary table, writes sweep_summary.{md,json}, and exits with
      status 1 when not a single job of the sweep dir finished.
    """

    def __init__(
        self,
        tolerate_failures: bool | str = "auto",
        write_summary: bool = True,
        exit_nonzero_if_all_failed: bool = True,
        metric: str = "eval_loss",
    ) -> None:
        self.tolerate_failures = tolerate_failures
        self.write_summary = bool(write_summary)
        self.exit_nonzero_if_all_failed = bool(exit_nonzero_if_all_failed)
        self.metric = metric

    def _tolerate(self, config: DictConfig) -> bool:
        text = str(self.tolerate_failures).lower()
        if text in ("true", "false"):  # a bool, or the YAML text of one
            return text == "true"
        target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
        return target.endswith("BasicSweeper")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status != JobStatus.FAILED:
            return
        error = job_return._return_value
        run_dir = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        multirun = str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN")
        if run_dir:
            status = read_status(run_dir)
            if not status or status.get("status") in (RUNNING, None):
                if not status:
                    overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
                    mark_running(run_dir, overrides)
                mark_failed(run_dir, error, oom=is_oom(error))
        if not multirun or not self._tolerate(config):
            return
        if isinstance(error, BaseException):
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            log.error("job failed; the sweep goes on:\n%s", redact_text(trace))
        job_return.status = JobStatus.COMPLETED
        job_return.return_value = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if not sweep_dir or not Path(sweep_dir).is_dir():
            return
        summary = (write_summary if self.write_summary else summarize)(sweep_dir, self.metric)
        print(format_summary(summary), flush=True)
        rows = summary["jobs"]
        if self.exit_nonzero_if_all_failed and rows and not any(r["status"] == FINISHED for r in rows):
            where = Path(sweep_dir) / "sweep_summary.md"
            print(f"fine_tune: no job of the sweep finished (see {where})", file=sys.stderr)
            raise SystemExit(1)
