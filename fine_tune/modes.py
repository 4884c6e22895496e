"""Modes that inspect a run instead of training it: plan (memory), validate (dry run), preview (data)."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

# Each mode's function, `module:name`, imported only when the mode is chosen.
RUNNERS = {
    "plan": "fine_tune.plan:print_plan",
    "validate": "fine_tune.validate:print_validation",
    "preview": "fine_tune.data_preview:preview_from_config",
}
MODES = tuple(RUNNERS)


def selected(cfg: DictConfig) -> list[str]:
    return [mode for mode in MODES if cfg.get(mode)]


def dispatch(cfg: DictConfig) -> None:
    """Run each selected mode in order; none of them loads weights or trains."""
    from fine_tune.schema import check_types

    check_types(cfg)
    for mode in selected(cfg):
        module, name = RUNNERS[mode].split(":")
        getattr(importlib.import_module(module), name)(cfg)
