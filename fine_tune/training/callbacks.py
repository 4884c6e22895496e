"""Callbacks that give every run its own record, independent of any tracking server: the per-step
metrics log (metrics.jsonl), throughput and memory, forwarded to the configured tracker."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from fine_tune.hardware import is_main_process, peak_memory_gib
from fine_tune.utils.io import append_jsonl

log = logging.getLogger("fine_tune")

SHOWN = {
    "train/loss": "loss",
    "eval/loss": "eval loss",
    "eval/perplexity": "ppl",
    "train/learning_rate": "lr",
    "train/grad_norm": "grad",
    "perf/tokens_per_second": "tok/s",
}


def format_row(row: dict[str, float]) -> str:
    """One short console line per logging step (the full record is in metrics.jsonl)."""
    parts = []
    for key, label in SHOWN.items():
        if key in row:
            value = row[key]
            text = (
                f"{value:.3g}"
                if key == "train/learning_rate"
                else f"{value:.4f}"
                if "loss" in key
                else f"{value:.0f}"
                if key == "perf/tokens_per_second"
                else f"{value:.3f}"
            )
            parts.append(f"{label} {text}")
    return "  ".join(parts)


# HF log keys -> our stable metric names (the same in metrics.jsonl, W&B and TensorBoard).
RENAMES = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "eval_loss": "eval/loss",
}


class MetricsLogCallback(TrainerCallback):
    """Writes one JSON line per logging step and forwards the same numbers to the tracker."""

    def __init__(self, run_dir: Path, tracker: Any) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tracker = tracker
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self._clock = time.perf_counter()
        self.train_time = 0.0
        self._tokens_at_clock = 0

    def resume_from(self, rows: list[dict]) -> None:
        """Continue the loss record of the interrupted run, so metrics.json describes the whole run."""
        for row in rows:
            if "train/loss" in row:
                if self.first_loss is None:
                    self.first_loss = float(row["train/loss"])
                self.last_loss = float(row["train/loss"])
            if "eval/loss" in row:
                self.last_eval = {"eval_loss": float(row["eval/loss"]), "step": int(row["step"])}

    def on_train_begin(self, args, state, control, **kwargs):
        self._clock = time.perf_counter()
        self._tokens_at_clock = state.num_input_tokens_seen or 0

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation time is not training throughput: restart the clock after it.
        self._clock = time.perf_counter()

    def tokens_per_second(self, state) -> float | None:
        now = time.perf_counter()
        tokens = (state.num_input_tokens_seen or 0) - self._tokens_at_clock
        elapsed = now - self._clock
        self._clock, self._tokens_at_clock = now, state.num_input_tokens_seen or 0
        if elapsed <= 0 or tokens <= 0:
            return None
        self.train_time += elapsed
        return tokens / elapsed

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "train_loss" in logs:  # the end-of-training summary, not a step
            return
        row: dict[str, float] = {}
        for key, value in logs.items():
            name = RENAMES.get(key)
            if name is None:
                continue
            try:  # transformers 5 formats some logged values as strings
                row[name] = float(value)
            except (TypeError, ValueError):
                continue
        if "eval/loss" in row:
            row["eval/perplexity"] = math.exp(min(row["eval/loss"], 50.0))
            self.last_eval = {"eval_loss": row["eval/loss"], "step": state.global_step}
        if "train/loss" in row:
            if self.first_loss is None:
                self.first_loss = row["train/loss"]
            self.last_loss = row["train/loss"]
            speed = self.tokens_per_second(state)
            if speed is not None:
                row["perf/tokens_per_second"] = speed
        if not row:
            return
        row["perf/tokens_seen"] = float(state.num_input_tokens_seen or 0)
        row["perf/peak_memory_gib"] = peak_memory_gib()
        if is_main_process():
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **row})
            self.tracker.log_metrics(row, step=state.global_step)
            log.info("step %d/%d  %s", state.global_step, state.max_steps, format_row(row))
