"""What transformers' resume gets wrong, for a resumed run to equal the uninterrupted one.

- A checkpoint at the last step (a job killed while saving the final adapter, or preempted after
  its last checkpoint): `Trainer.train(resume_from_checkpoint=...)` enters the loop anyway and trains
  one step past the end before it checks `max_steps`. Here the loop is not entered.
- The logged loss is the mean over the steps since the last logging step. Transformers keeps that
  running sum in memory only and restarts it at the resume step, so the first loss logged after a
  resume averages fewer steps. Here the partial sum and the step it started after are written into
  every checkpoint and put back before training continues; so are the per-step values a trainer
  averages into its other logged metrics (`logging_window_state`, e.g. the rewards of DPO).

A mixin for `transformers.Trainer` (and its subclasses), placed before it in the bases. It relies on
private members of transformers 5.23 (`_run_epoch`, `_tr_loss`, `_globalstep_last_logged`,
`_save_checkpoint`); tests/test_resume.py fails if they change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WINDOW_FILE = "logging_window.json"


def window_file(directory: str | Path, process_index: int, world_size: int) -> Path:
    """One file per process under torchrun: each rank sums its own losses between logging steps."""
    name = WINDOW_FILE if world_size <= 1 else f"logging_window_{process_index}.json"
    return Path(directory) / name


class ExactResume:
    """Mixin: no step past the end on resume, and the logging window carried through checkpoints."""

    _window_to_restore: dict[str, Any] | None = None

    def logging_window_state(self) -> dict[str, Any]:
        """JSON values a subclass accumulates between logging steps (beyond the loss), to restore."""
        return {}

    def restore_logging_window_state(self, state: dict[str, Any]) -> None:
        """Put back what `logging_window_state` returned when the checkpoint was written."""

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        result = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        self._window_to_restore = None
        if resume_from_checkpoint is not None:
            path = window_file(resume_from_checkpoint, self.args.process_index, self.args.world_size)
            if path.is_file():
                self._window_to_restore = json.loads(path.read_text(encoding="utf-8"))
        return result

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        if self.state.global_step >= self.state.max_steps:  # resumed at the end: nothing left to train
            self.control.should_training_stop = True
            return
        window, self._window_to_restore = self._window_to_restore, None
        if window:
            # The loop has just reset both: the sum restarts from the saved partial sum exactly
            # (0 + s == s), so every later addition happens in the uninterrupted run's order.
            self._tr_loss += float(window["loss_sum"])
            self._globalstep_last_logged = int(window["last_logged_step"])
            self.restore_logging_window_state(window.get("state") or {})
        super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        window = {
            "loss_sum": float(self._tr_loss.item()),
            "last_logged_step": self._globalstep_last_logged,
            "state": self.logging_window_state(),
        }
        path = window_file(folder, self.args.process_index, self.args.world_size)
        path.write_text(json.dumps(window) + "\n", encoding="utf-8")
