"""The run directory of a single run: what Hydra writes into it, when it is kept, how it is shown.

Hydra creates the run directory, saves `.hydra/{config,hydra,overrides}.yaml` into it and opens the
job log there before the task function runs. Left alone, that gives

- a timestamped directory for every `plan=true` / `validate=true` / `preview=true` and for every run
  that stopped on a typo, so that "the latest run under outputs/" is the wrong one;
- a resume that rewrites the `.hydra/` record of how the run was started (the overrides a resume
  re-applies, the config generate and export rebuild the model from), and appends to the log of a
  run that has long finished.

`RunDirCallback` (hydra.callbacks, on_run_start: single runs) changes that before it happens
and remembers whether the directory existed; `discard_if_unused` then removes a directory this
process created and trained nothing in. Sweep jobs keep theirs in every case: the sweep summary
reads their status.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

# The record of training in a run dir (docs/contracts.md); Hydra's files, the job log, status.json
# and data_report.json are written before training starts.
TRAINED = ("metrics.jsonl", "samples.jsonl", "checkpoints", "metrics.json", "adapter")

# Directories this process created for its run (the run dir first, then parents it had to create).
_created: list[Path] = []


def saved_config(run_dir: Path) -> Path:
    return Path(run_dir) / ".hydra" / "config.yaml"


def shown(run_dir: Path) -> str:
    """The path as the user would type it: relative to the working directory when inside it."""
    path = Path(run_dir).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def holds_training(run_dir: Path) -> bool:
    """True once a run has recorded training in `run_dir`."""
    return any((Path(run_dir) / name).exists() for name in TRAINED)


def _missing_dirs(path: Path) -> list[Path]:
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def discard_if_unused(run_dir: Path) -> bool:
    """Remove `run_dir` (and the parents created with it, when empty) if this process created it and
    nothing was trained in it. Returns whether it was removed."""
    run_dir = Path(run_dir).resolve()
    if not _created or _created[0] != run_dir or holds_training(run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in _created[1:]:
        try:
            parent.rmdir()
        except OSError:  # not empty: another run lives there
            break
    _created.clear()
    return True


def _drop_log_file(job_logging: DictConfig) -> None:
    handlers = job_logging.get("handlers") or {}
    files = [name for name, spec in handlers.items() if "FileHandler" in str(spec.get("class", ""))]
    for name in files:
        del handlers[name]
    for logger in [job_logging.get("root"), *(job_logging.get("loggers") or {}).values()]:
        if logger is not None and "handlers" in logger:
            logger.handlers = [h for h in logger.handlers if h not in files]


class RunDirCallback(Callback):
    """What Hydra writes before a single run's task starts (see the module docstring):

    - plan / validate / preview: nothing (no .hydra/, no log file; the empty directory is removed
      afterwards);
    - a directory that holds a run: its .hydra/ files stay as they were; the log is appended to
      only by a resume that continues the run (not for a finished run, nor a refused new one);
    - anything else: Hydra's defaults;
    - under torchrun / accelerate launch: one directory for all ranks, rank 0's.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from fine_tune.distributed import share_run_dir
        from fine_tune.modes import MODES
        from fine_tune.sweep import should_skip
        from fine_tune.training.checkpoints import requested

        # ${now:} is cached; under torchrun every rank takes rank 0's directory
        shared = share_run_dir(str(OmegaConf.select(config, "hydra.run.dir")))
        run_dir = Path(shared).resolve()
        _created[:] = _missing_dirs(run_dir)
        inspecting = any(config.get(mode) is True for mode in MODES)
        existing = saved_config(run_dir).is_file() and holds_training(run_dir)
        continuing = existing and requested(config.get("resume")) and not should_skip(run_dir)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = shared
            if inspecting or existing:
                config.hydra.output_subdir = None
            if inspecting or (existing and not continuing):
                _drop_log_file(config.hydra.job_logging)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep under torchrun: every rank's jobs go into rank 0's sweep directory."""
        from fine_tune.distributed import share_run_dir

        own = str(OmegaConf.select(config, "hydra.sweep.dir"))
        shared = share_run_dir(own)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = shared
            if shared != own:
                # Each job's config is composed anew from these overrides (with this process's own
                # `${now:}`): without the override a rank that started a second later than rank 0
                # would still put its jobs in a directory of its own.
                quoted = shared.replace("\\", "\\\\").replace("'", "\\'")
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{quoted}'")
