"""Weights & Biases backend: one W&B run per Hydra job, grouped by sweep, offline without a key.

Why each choice:
- `reinit="create_new"` + `finish()` always: a Hydra multirun executes its jobs in one process;
  without both, every job after the first logs into the first job's run (wandb#1314).
- group = the sweep directory: all jobs of a sweep appear together, and a resumed sweep (rerun
  into the same dir) lands in the same group.
- config = flattened resolved config + overrides: flat keys are what parallel-coordinates and
  group-by panels can use; everything passes through `redact()` first.
- offline when no key is configured: a run on a laptop or an air-gapped cluster must not fail
  or hang on login; the user gets one `wandb sync` line to upload later.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from fine_tune.tracking.base import (
    Tracker,
    columns,
    flatten,
    is_main_process,
    job_run_name,
    resolve_job,
    run_config,
    sweep_group,
)
from fine_tune.tracking.redact import redact

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def has_api_key() -> bool:
    """True when W&B can authenticate without asking: WANDB_API_KEY or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    candidates = [os.environ.get("NETRC"), str(Path.home() / ".netrc"), str(Path.home() / "_netrc")]
    for path in candidates:
        if not path or not Path(path).is_file():
            continue
        try:
            auth = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if auth and auth[2]:
            return True
    return False


def resolve_mode(explicit: str | None) -> tuple[str, str]:
    """(mode, why): the yaml's `mode` if set, else WANDB_MODE, else online iff a key exists."""
    if explicit:
        return str(explicit), "logger.mode"
    env = os.environ.get("WANDB_MODE", "").strip()
    if env:
        return env, "WANDB_MODE"
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
        return "disabled", "WANDB_DISABLED"
    return ("online", "API key found") if has_api_key() else ("offline", "no W&B API key found")


@dataclass(eq=False)
class WandbTracker(Tracker):
    """Logs one job to one W&B run; see conf/logger/wandb.yaml for every option."""

    project: str = "fine_tune"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = "train"
    name: str | None = None
    tags: Sequence[str] | None = None
    notes: str | None = None
    mode: str | None = None
    dir: str | None = None  # mirrors wandb.init's argument name
    console: str = "auto"
    init_timeout: float = 120.0
    quiet: bool = False
    log_samples_table: bool = True

    _sync_hint_shown: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.tags = [str(t) for t in (self.tags or [])]
        self.init_timeout = float(self.init_timeout)
        self.quiet, self.log_samples_table = bool(self.quiet), bool(self.log_samples_table)
        self._run: Any = None
        self._wandb: Any = None
        self._samples: list[dict[str, Any]] = []
        self._warned = False

    @property
    def run(self) -> Any:
        """The live `wandb.Run` (None on non-zero ranks, before start and after finish)."""
        return self._run

    def start(self, cfg: Any, run_dir: str | os.PathLike, job: Mapping[str, Any] | None = None) -> None:
        if self._run is not None or not is_main_process():
            return
        mode, why = resolve_mode(self.mode)
        if mode == "disabled":
            log.info("W&B disabled (%s); nothing is logged to W&B for this run.", why)
            return
        import wandb

        self._wandb = wandb
        job = resolve_job(job)
        run_dir = Path(run_dir)
        wandb_dir = Path(self.dir) if self.dir else run_dir
        wandb_dir.mkdir(parents=True, exist_ok=True)
        config = run_config(cfg, job)
        config["run_dir"] = str(run_dir)
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group or sweep_group(job.get("sweep_dir")),
            job_type=self.job_type,
            name=self.name or job_run_name(job),
            tags=[t[:64] for t in self.tags] or None,
            notes=redact(self.notes) if self.notes else None,
            dir=str(wandb_dir),
            config=config,
            mode=mode,
            reinit="create_new",
            settings=wandb.Settings(init_timeout=self.init_timeout, console=self.console, quiet=self.quiet),
        )
        if mode in ("offline", "dryrun") and not WandbTracker._sync_hint_shown:
            WandbTracker._sync_hint_shown = True
            if job.get("sweep_dir"):
                target = f"{job['sweep_dir']}/*/wandb/offline-run-*"
            else:
                target = f"{wandb_dir}/wandb/offline-run-*"
            log.warning("W&B is offline (%s). Upload later with: wandb sync %s", why, target)

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Run a W&B call without ever failing the training run; warn once, stay quiet after."""
        try:
            fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - a dashboard hiccup must not lose hours of training
            if not self._warned:
                self._warned = True
                log.warning("W&B %s failed (further W&B errors are not shown): %s", what, redact(str(error)))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._run is None:
            return
        data = {k: v for k, v in flatten(dict(metrics), sep="/").items() if v is not None}
        if data:
            self._safe("log", self._run.log, data, step=int(step))

    def _table(self, rows: Sequence[Mapping[str, Any]]) -> Any:
        names = columns(rows)
        return self._wandb.Table(columns=names, data=[[redact(r.get(c), key=c) for c in names] for r in rows])

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        if self._run is None or not rows:
            return
        rows = [{"step": int(step), **dict(r)} for r in rows]
        self._samples.extend(rows)
        if self.log_samples_table:
            self._safe("log samples", lambda: self._run.log({"samples": self._table(rows)}, step=int(step)))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        values = redact(flatten(dict(metrics), sep="/"))
        self._safe("summary", self._run.summary.update, values)
        if self._samples and self.log_samples_table:
            table = self._table(self._samples)
            self._safe("summary samples", self._run.summary.__setitem__, "samples_all", table)

    def finish(self, status: str = "finished") -> None:
        run, self._run = self._run, None
        if run is None:
            return
        self._samples = []
        self._safe("status", run.summary.__setitem__, "status", str(status))
        if status == "preempted":
            self._safe("mark_preempting", run.mark_preempting)
        self._safe("finish", run.finish, exit_code=0 if status == "finished" else 1)
