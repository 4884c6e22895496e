"""`logger=none`: the same calls as every tracker, nothing recorded beyond the run dir's own files.

Exists so the core never branches on "is there a tracker"; metrics.jsonl / metrics.json are
written by the core regardless of the logger.
"""

from __future__ import annotations

from fine_tune.tracking.base import Tracker


class NoneTracker(Tracker):
    """Accepts every tracker call and does nothing."""

    def __init__(self, **_: object) -> None:
        """Accept and ignore options so switching `logger=` never breaks a command line."""
