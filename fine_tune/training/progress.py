"""A progress bar for a person watching a long run: steps, ETA and tokens/s in one line.

Only when stderr is a terminal: in a log file, a pipe or CI a bar is noise (carriage returns,
hundreds of redraws), and there the log stays one line per logging step. While the bar is shown,
log lines are written above it (tqdm's logging redirect) instead of through it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import IO, Any

from transformers import TrainerCallback

from fine_tune.hardware import is_main_process


def wanted(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and is_main_process()


class ProgressBar(TrainerCallback):
    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self._logs_above: contextlib.ExitStack | None = None
        self._clock = 0.0
        self._tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not wanted(self.stream) or state.global_step >= state.max_steps:
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,  # a resumed run: the ETA counts what is left
            file=self.stream,
            unit="step",
            dynamic_ncols=True,
            leave=False,
        )
        self._logs_above = contextlib.ExitStack()
        self._logs_above.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        self._clock, self._tokens = time.perf_counter(), state.num_input_tokens_seen or 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        elapsed = time.perf_counter() - self._clock
        tokens = (state.num_input_tokens_seen or 0) - self._tokens
        if elapsed > 0 and tokens > 0:
            self.bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.close()
        self.bar = None
        if self._logs_above is not None:
            self._logs_above.close()
            self._logs_above = None
