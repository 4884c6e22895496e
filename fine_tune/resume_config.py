"""`resume=true hydra.run.dir=<run>` continues that run with the config it was started with.

A resume's command line usually names only the run (`python -m fine_tune resume=true
hydra.run.dir=outputs/train/<time>`), not the overrides the run was started with, and Hydra composes
from the command line alone: a run started with `trainer=cpu` would resume with the default trainer.
So:

- before Hydra composes, `with_saved_overrides` puts the run's own overrides (its
  `.hydra/overrides.yaml`) in front of the command line's; a key given again on the command line
  replaces the saved one;
- once it has, `check_unchanged` refuses a config that still differs from the run's saved
  `.hydra/config.yaml` (an override that changes something, or conf/ files edited since), naming
  the keys: a resumed run must be the interrupted one, step for step. Only `resume` may differ. To
  train on from a checkpoint with another config, start a new run from it:
  `resume=<run>/checkpoints/checkpoint-<step> hydra.run.dir=<new dir> ...`.

Sweeps (`-m`) need neither: a job's directory is named by its overrides, so a rerun of the same
sweep brings the same overrides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fine_tune.errors import UserError
from fine_tune.tracking.base import split_override

_RUN_DIR = "hydra.run.dir"
_MAY_DIFFER = ("resume",)


def _last_value(args: list[str], key: str) -> str | None:
    values = [split_override(arg)[1] for arg in args if "=" in arg and split_override(arg)[0] == key]
    return values[-1] if values else None


def with_saved_overrides(argv: list[str]) -> list[str]:
    """`argv` with the overrides of the run being resumed put first (unchanged when not resuming)."""
    from fine_tune.run_dir import saved_config
    from fine_tune.training.checkpoints import requested

    args = argv[1:]
    if "-m" in args or "--multirun" in args or not requested(_last_value(args, "resume")):
        return argv
    run_dir = _last_value(args, _RUN_DIR) or os.environ.get("FINE_TUNE_RUN_DIR")
    saved = saved_config(Path(run_dir)).with_name("overrides.yaml") if run_dir else None
    if saved is None or not saved.is_file():
        return argv
    from omegaconf import OmegaConf

    given = {split_override(arg)[0] for arg in args if not arg.startswith("-")}
    kept = [str(o) for o in OmegaConf.load(saved) if split_override(str(o))[0] not in given]
    return [argv[0], *kept, *args]


def differences(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every leaf that differs, keys in order."""
    from fine_tune.tracking.base import flatten

    before, after = flatten(saved), flatten(current)
    missing = object()
    changed = []
    for key in sorted(set(before) | set(after)):
        if key.split(".")[0] in _MAY_DIFFER:
            continue
        old, new = before.get(key, missing), after.get(key, missing)
        if old != new:
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            changed.append(f"{key}: {show(old)} -> {show(new)}")
    return changed


def with_new_keys(saved: dict) -> dict:
    """A run's saved config with the groups and run-level keys fine_tune gained since it was written
    (the `method` group, `init_adapter`) at their defaults: what that run did, in today's keys."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from fine_tune.schema import GROUP_SCHEMAS, RunSchema, default

    for group, schema in GROUP_SCHEMAS.items():
        if group not in saved:
            saved[group] = OmegaConf.to_container(OmegaConf.structured(schema))
    for spec in fields(RunSchema):
        if spec.name not in saved and spec.name not in GROUP_SCHEMAS and spec.name != "logger":
            saved[spec.name] = default(RunSchema, spec.name)
    return saved


def check_unchanged(cfg: Any, run_dir: Path) -> None:
    """Refuse to resume `run_dir` with a config other than the one it was started with."""
    from omegaconf import OmegaConf

    from fine_tune.run_dir import saved_config, shown

    path = saved_config(run_dir)
    if not path.is_file():
        return
    saved = with_new_keys(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    changed = differences(saved, OmegaConf.to_container(cfg, resolve=False))
    if changed:
        listed = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise UserError(
            f"the config differs from the one this run was started with ({listed})",
            where="resume",
            hint=f"resume with the run's own config (drop the overrides that change it; the run's "
            f"overrides are applied for you: {shown(path.with_name('overrides.yaml'))}), or continue "
            "in a new run directory: resume=<checkpoint dir> hydra.run.dir=<new dir>",
        )
