"""Checkpoints that are either whole or absent, and the resume logic that trusts only whole ones.

HF Trainer writes `checkpoint-<step>/` file by file in place: a job killed mid-save (SLURM's grace
period is short) leaves a directory that looks like a checkpoint but lacks the optimizer or the
trainer state, and `resume` would then crash or, worse, silently restart the schedule. Here every
checkpoint is written into `checkpoints/.staging/` and renamed into place, and rotation renames a
checkpoint away before deleting it, so a directory named `checkpoint-<step>` is always complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from fine_tune.errors import UserError
from fine_tune.utils.io import remove_dir

PREFIX = "checkpoint-"
STAGING = ".staging"
# Files without which a checkpoint cannot continue training exactly.
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
_STEP = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (
        path.is_dir()
        and all((path / name).is_file() for name in REQUIRED)
        and any(path.glob("adapter_model.*"))
    )


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (by step, not mtime: clocks and copies lie)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def rotate(root: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints; None or <= 0 keeps all."""
    if not keep or keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        remove_dir(old)


def clean_leftovers(root: Path) -> None:
    """Half-written staging dirs and interrupted deletions from a killed job."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name == STAGING or path.name.startswith(".deleting-"):
            shutil.rmtree(path, ignore_errors=True)


def requested(resume: Any) -> bool:
    """Whether `resume` (a config value or the text of a command-line override) asks to continue."""
    return resume not in (None, False) and not (
        isinstance(resume, str) and resume.lower() in ("", "false", "no")
    )


def find_checkpoint(resume: Any, run_dir: Path) -> Path | None:
    """`resume` -> the checkpoint directory to continue from, or None to start fresh.

    true: the latest complete checkpoint of this run dir (none yet: start fresh, which is what a
    SLURM requeue of a job preempted before its first checkpoint needs). A path: a checkpoint
    directory, or a run dir / checkpoints dir whose latest checkpoint is taken.
    """
    if not requested(resume):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "yes", "latest")):
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise UserError(
            f"checkpoint '{path}' does not exist",
            where="resume",
            hint="use resume=true for this run dir's latest checkpoint, or a checkpoint-<step> directory",
        )
    if checkpoint_step(path) is not None:
        if not is_complete(path):
            raise UserError(
                f"checkpoint '{path}' is incomplete (missing one of {list(REQUIRED)} or the adapter)",
                where="resume",
                hint="pick an earlier checkpoint",
            )
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise UserError(f"no complete checkpoint under '{path}'", where="resume")


def trim_jsonl(path: Path, step: int) -> list[dict]:
    """Drop the records logged after `step` (they belong to the timeline being replaced); return the rest.

    A resumed run recomputes those steps, and metrics.jsonl must read as one continuous run.
    """
    if not path.is_file():
        return []
    kept, lines = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if int(row.get("step", 0)) <= step:
            kept.append(row)
            lines.append(line)
    from fine_tune.utils.io import atomic_write_text

    atomic_write_text(path, "".join(f"{line}\n" for line in lines))
    return kept


def prepare_resume(
    resume: Any, run_dir: Path, lora: Any = None, trainer: Any = None
) -> tuple[Path | None, list[dict]]:
    """The checkpoint to continue from, checked against the config, with the run's logs cut back to
    its step.

    Returns (checkpoint or None, metrics.jsonl rows kept). Leftovers of a kill mid-save are removed
    first, so they can neither be picked nor fill the disk. Starting fresh (no checkpoint) keeps no
    rows at all: those of an attempt killed before its first checkpoint would otherwise be logged
    twice.
    """
    import logging

    run_dir = Path(run_dir)
    clean_leftovers(run_dir / "checkpoints")
    checkpoint = find_checkpoint(resume, run_dir)
    step = 0
    if checkpoint is not None:
        if lora is not None and trainer is not None:
            check_compatible(checkpoint, lora, trainer)
        step = checkpoint_step(checkpoint) or 0
        logging.getLogger("fine_tune").info("resuming from %s (step %d)", checkpoint, step)
    trim_jsonl(run_dir / "samples.jsonl", step)
    return checkpoint, trim_jsonl(run_dir / "metrics.jsonl", step)


def adapter_mismatch(saved: dict, lora: Any) -> tuple[str, Any, Any] | None:
    """(key, saved value, configured value) of the first adapter setting a saved adapter_config.json
    and the `lora` node disagree on (rank, alpha, listed targets); None when they agree."""
    for key in ("r", "lora_alpha"):
        if key in saved and key in lora and float(saved[key]) != float(lora[key]):
            return key, saved[key], lora[key]
    targets = lora.get("target_modules")
    listed = isinstance(saved.get("target_modules"), list) and targets and not isinstance(targets, str)
    if listed and sorted(saved["target_modules"]) != sorted(str(t) for t in targets):
        return "target_modules", sorted(saved["target_modules"]), sorted(str(t) for t in targets)
    return None


def check_compatible(checkpoint: Path, lora: Any, trainer: Any) -> None:
    """Refuse to resume a checkpoint written with another adapter shape or batch size.

    A different rank fails deep inside PEFT's loader with a size-mismatch traceback; a different
    batch size silently breaks the data position (the loader skips `step x batch` examples), so the
    resumed run would no longer be the interrupted one.
    """
    from fine_tune.adapters import ADAPTER_CONFIG
    from fine_tune.utils.io import read_json

    mismatch = adapter_mismatch(read_json(checkpoint / ADAPTER_CONFIG) or {}, lora)
    if mismatch:
        key, saved, wanted = mismatch
        raise UserError(
            f"the checkpoint was trained with {key}={saved}, the config says {wanted}",
            where=f"lora.{key}",
            hint=f"resume with the config the checkpoint was written with ({checkpoint.parent.parent}"
            "/.hydra/config.yaml), or start a new run dir",
        )
    state = read_json(checkpoint / "trainer_state.json") or {}
    batch = state.get("train_batch_size")
    if batch is not None and int(batch) != int(trainer["per_device_train_batch_size"]):
        raise UserError(
            f"the checkpoint was trained with batch size {batch}, the config says "
            f"{trainer['per_device_train_batch_size']}: the data position would not match",
            where="trainer.per_device_train_batch_size",
            hint="resume with the same batch size (change gradient_accumulation_steps in a new run instead)",
        )
