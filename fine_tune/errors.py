"""User-facing errors.

Anything a user can fix (a config value, a path, a data row) raises `UserError`; the entrypoints
print it as one short paragraph and exit with `EXIT_USER_ERROR`, never with a traceback wall.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's config, data, paths or command line.

    `where` names the offending key, file or file:line; `hint` says what to do about it.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  -> {self.hint}"
        return text


def report(error: BaseException, stream=None) -> None:
    """Print an error the way users should see it: one paragraph, no traceback."""
    stream = stream or sys.stderr
    print(f"fine_tune error: {error}", file=stream)


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; the job should be requeued."""

    def __init__(self, signum: int, checkpoint: str | None, previous: Any = None) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped on {name}; checkpoint {checkpoint or '(none)'}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.previous = previous

    @property
    def exit_code(self) -> int:
        """128 + the signal (SIGINT 130, SIGTERM 143, SIGUSR2 140): the shell's and the schedulers'
        convention for a process stopped by that signal, so a wrapper script can tell them apart."""
        return 128 + self.signum

    def forward_signal(self) -> None:
        """Give the signal to the handler that was there before ours, now that the checkpoint is safe.

        Under Hydra's submitit launcher that handler is submitit's: on SIGUSR2 it requeues the job
        (which then resumes with resume=true) and exits. Python's default SIGINT handler is skipped,
        since it would only turn a clean stop into a KeyboardInterrupt traceback.
        """
        if callable(self.previous) and self.previous is not signal.default_int_handler:
            self.previous(self.signum, None)
