"""Clean stops on SIGTERM / SIGINT: finish the current optimizer step, checkpoint, exit 143.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM some seconds before killing a job. Dying
on the spot loses everything since the last periodic checkpoint; instead the handler only raises a
flag, and the callback turns it into "save now, stop" at the next step boundary, where the model,
optimizer and data position are consistent. A second signal means "now": the default handler is
restored, so pressing Ctrl-C twice still interrupts at once.

The handler runs between two bytecodes of whatever the main thread was doing, possibly in the
middle of a write to the log file: logging there (or writing through any buffered stream) raises
"reentrant call inside <_io.BufferedWriter>". So the handler records the signal and acknowledges it
with one unbuffered write to stderr; the step end (or, before training, the run) logs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from types import FrameType
from typing import Any

from transformers import TrainerCallback

from fine_tune.distributed import max_over_ranks
from fine_tune.errors import Preempted  # noqa: F401  raised by run.py with this handler's signal
from fine_tune.hardware import is_main_process

log = logging.getLogger("fine_tune")

# SIGUSR2 is what SLURM sends before the time limit under submitit (`signal_delay_s`).
SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR2", None)) if s)


class PreemptionHandler(TrainerCallback):
    """Installs the signal handlers for the duration of training; see the module docstring."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionHandler:
        for sig in SIGNALS:
            # Not the main thread (a notebook's worker): no clean stop then, the default stays.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def previous_handler(self) -> Any:
        return self._previous.get(self.signum) if self.signum is not None else None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # second signal: stop trying to be graceful
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signum = signum
        if is_main_process():  # an answer now: a step can take minutes; not a log call (see above)
            name = signal.Signals(signum).name
            text = f"\n{name} received: stopping after this step, with a checkpoint (again: stop now)\n"
            with contextlib.suppress(OSError):  # stderr closed: the step end still logs it
                os.write(2, text.encode())

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def on_step_end(self, args, state, control, **kwargs):
        # Under torchrun or srun the signal may reach one rank a step before the others: every rank
        # stops at the first step any of them saw it (one all-reduce of an integer per step).
        signum = max_over_ranks(self.signum or 0)
        if signum:
            self.signum = self.signum or signum
            log.warning(
                "%s received: saving a checkpoint at step %d, then stopping",
                signal.Signals(self.signum).name,
                state.global_step,
            )
            control.should_save = True
            control.should_training_stop = True
        return control
