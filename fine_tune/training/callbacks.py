"""Callbacks that give every run its own record, independent of any tracking server: the per-step
metrics log (metrics.jsonl), throughput over training time only, MFU and memory, forwarded to the
configured tracker."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from fine_tune.hardware import is_main_process, peak_memory_gib
from fine_tune.training.throughput import PhaseTimer, TrainingClock, mfu
from fine_tune.utils.io import append_jsonl

log = logging.getLogger("fine_tune")

# The console line's metrics: label and number format.
SHOWN = {
    "train/loss": ("loss", ".4f"),
    "eval/loss": ("eval loss", ".4f"),
    "eval/perplexity": ("ppl", ".3f"),
    "train/learning_rate": ("lr", ".3g"),
    "train/grad_norm": ("grad", ".3f"),
    "train/rewards/accuracies": ("acc", ".3f"),
    "train/rewards/margins": ("margin", ".3f"),
    "perf/tokens_per_second": ("tok/s", ".0f"),
    "perf/mfu": ("mfu", ".3f"),
}


def format_row(row: dict[str, float]) -> str:
    """One short console line per logging step (the full record is in metrics.jsonl)."""
    return "  ".join(f"{label} {row[key]:{spec}}" for key, (label, spec) in SHOWN.items() if key in row)


# HF / TRL log keys -> our stable metric names (the same in metrics.jsonl, W&B and TensorBoard).
RENAMES = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "mean_token_accuracy": "train/token_accuracy",  # TRL: share of trained tokens predicted top-1
    "eval_loss": "eval/loss",
    "eval_mean_token_accuracy": "eval/token_accuracy",
    "eval_runtime": "perf/eval_seconds",
}
# What TRL's preference trainers log per step (DPO and ORPO alike; ORPO's rewards are beta x the mean
# log-probability of an answer, its own metrics the log-odds terms): the same name under train/ and eval/.
PREFERENCE_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
)
RENAMES.update({key: f"train/{key}" for key in PREFERENCE_METRICS})
RENAMES.update({f"eval_{key}": f"eval/{key}" for key in PREFERENCE_METRICS})
# The last logged value of these goes into metrics.json (compare's columns), under these names.
FINAL = {
    "train/rewards/accuracies": "reward_accuracy",
    "train/rewards/margins": "reward_margin",
    "eval/rewards/accuracies": "eval_reward_accuracy",
    "eval/rewards/margins": "eval_reward_margin",
}


class MetricsLogCallback(TrainerCallback):
    """Writes one JSON line per logging step and forwards the same numbers to the tracker.

    Tokens/s and MFU of a row cover the training time since the previous row, with evaluation,
    samples and checkpoint saves taken out (`timer`); `summary()` gives the run's totals.
    """

    def __init__(
        self,
        run_dir: Path,
        tracker: Any,
        timer: PhaseTimer | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        perplexity: bool = True,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tracker = tracker
        self.timer = timer or PhaseTimer()
        self.clock = TrainingClock(self.timer)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.perplexity = perplexity  # False for preference losses: exp(loss) is no perplexity there
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self.latest: dict[str, float] = {}  # the last logged value of each FINAL metric
        self._sample_seconds_logged = 0.0

    def resume_from(self, rows: list[dict]) -> None:
        """Continue the loss record of the interrupted run, so metrics.json describes the whole run."""
        for row in rows:
            if "train/loss" in row:
                if self.first_loss is None:
                    self.first_loss = float(row["train/loss"])
                self.last_loss = float(row["train/loss"])
            if "eval/loss" in row:
                self.last_eval = {"eval_loss": float(row["eval/loss"]), "step": int(row["step"])}
            self.latest.update({key: float(row[key]) for key in FINAL if key in row})

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock.start(state.num_input_tokens_seen or 0)

    def on_train_end(self, args, state, control, **kwargs):
        self.clock.lap(state.num_input_tokens_seen or 0)  # the steps after the last logged one

    def tokens_per_second(self, state) -> float | None:
        seconds, tokens = self.clock.lap(state.num_input_tokens_seen or 0)
        return tokens / seconds if seconds > 0 and tokens > 0 else None

    def summary(self) -> dict[str, float | None]:
        """The run's speed for metrics.json: this process's training tokens over its training time."""
        speed = self.clock.tokens / self.clock.seconds if self.clock.seconds > 0 else None
        return {
            "tokens_per_second": speed,
            "mfu": mfu(speed, self.flops_per_token, self.peak_flops),
            "train_time_s": self.clock.seconds,
            "eval_time_s": self.timer.seconds["eval"],
            "sample_time_s": self.timer.seconds["samples"],
            "checkpoint_time_s": self.timer.seconds["checkpoint"],
            **{FINAL[key]: value for key, value in self.latest.items()},
        }

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
            if self.perplexity:
                row["eval/perplexity"] = math.exp(min(row["eval/loss"], 50.0))
            self.last_eval = {"eval_loss": row["eval/loss"], "step": state.global_step}
        if "train/loss" in row:
            if self.first_loss is None:
                self.first_loss = row["train/loss"]
            self.last_loss = row["train/loss"]
            speed = self.tokens_per_second(state)
            if speed is not None:
                row["perf/tokens_per_second"] = speed
                share = mfu(speed, self.flops_per_token, self.peak_flops)
                if share is not None:
                    row["perf/mfu"] = share
        if not row:
            return
        self.latest.update({key: row[key] for key in FINAL if key in row})
        sampled = self.timer.seconds["samples"] - self._sample_seconds_logged
        if sampled > 0:  # samples generated since the previous row (eval rows carry their own time)
            row["perf/sample_seconds"] = sampled
            self._sample_seconds_logged = self.timer.seconds["samples"]
        row["perf/tokens_seen"] = float(state.num_input_tokens_seen or 0)
        row["perf/peak_memory_gib"] = peak_memory_gib()
        if is_main_process():
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **row})
            self.tracker.log_metrics(row, step=state.global_step)
            log.info("step %d/%d  %s", state.global_step, state.max_steps, format_row(row))
