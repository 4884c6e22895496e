"""TensorBoard backend: per-job event files under the run dir, comparable across a sweep.

`tensorboard --logdir <sweep dir>` shows every job of a sweep as one run (each job writes to
`<job dir>/tensorboard`), and the HParams tab gets one row per job (its overrides + final
metrics), which is TensorBoard's counterpart of W&B's parallel-coordinates view.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fine_tune.tracking.base import Tracker, columns, is_main_process, overrides_dict, resolve_job, run_config
from fine_tune.tracking.redact import redact, redact_override
from fine_tune.utils.format import finite_number

log = logging.getLogger(__name__)


def _hparam_value(text: str) -> Any:
    """CLI override text -> the typed value HParams can sort/filter on."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


class TensorBoardTracker(Tracker):
    """Writes scalars, sample tables (as text) and an HParams summary per job."""

    def __init__(
        self,
        log_dir: str | None = None,
        flush_secs: int = 30,
        log_hparams: bool = True,
        hparam_metrics: Sequence[str] = ("eval_loss", "eval_perplexity", "train_loss"),
    ) -> None:
        self.log_dir = log_dir
        self.flush_secs = int(flush_secs)
        self.log_hparams = bool(log_hparams)
        self.hparam_metrics = list(hparam_metrics)
        self._writer: Any = None
        self._job: dict[str, Any] = {}

    def start(self, cfg: Any, run_dir: str | os.PathLike, job: Mapping[str, Any] | None = None) -> None:
        if self._writer is not None or not is_main_process():
            return
        from torch.utils.tensorboard import SummaryWriter

        self._job = resolve_job(job)
        target = Path(self.log_dir) if self.log_dir else Path(run_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(target), flush_secs=self.flush_secs)
        config = json.dumps(run_config(cfg, self._job), indent=2, sort_keys=True, default=str)
        self._writer.add_text("config", "```\n" + config + "\n```", 0)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._writer is None:
            return
        for key, value in metrics.items():
            number = finite_number(value)  # 0-d tensors and numpy scalars too
            if number is not None:
                self._writer.add_scalar(str(key), number, int(step))

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        if self._writer is None or not rows:
            return
        from fine_tune.compare import markdown_table

        names = columns(rows)
        cells = [[str(redact(r.get(c, ""))).replace("\n", "<br>") for c in names] for r in rows]
        self._writer.add_text("samples", markdown_table(names, cells), int(step))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        finals = {k: finite_number(v) for k, v in metrics.items()}
        finals = {k: v for k, v in finals.items() if v is not None}
        for key, value in finals.items():
            self._writer.add_scalar(f"final/{key}", value, 0)
        if self.log_hparams:
            overrides = [redact_override(o) for o in self._job.get("overrides", [])]
            hparams = {k: _hparam_value(v) for k, v in overrides_dict(overrides).items()}
            hparams.update({f"choices.{g}": c for g, c in (self._job.get("choices") or {}).items()})
            wanted = {f"hparam/{k}": finals[k] for k in self.hparam_metrics if k in finals}
            if hparams and wanted:
                self._writer.add_hparams(hparams, wanted, run_name=".")

    def finish(self, status: str = "finished") -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.add_text("status", str(status), 0)
            writer.close()
        except Exception as error:  # noqa: BLE001 - called from `finally`; must not mask the real error
            log.warning("TensorBoard writer did not close cleanly: %s", error)
