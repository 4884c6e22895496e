"""Modes that inspect a run instead of training it: plan (memory), validate (dry run), preview (data)."""

from __future__ import annotations

from omegaconf import DictConfig

MODES = ("plan", "validate", "preview")


def selected(cfg: DictConfig) -> list[str]:
    return [mode for mode in MODES if cfg.get(mode)]


def dispatch(cfg: DictConfig) -> None:
    """Run each selected mode in order; none of them loads weights or trains."""
    from fine_tune.schema import check_types

    check_types(cfg)
    for mode in selected(cfg):
        if mode == "plan":
            from fine_tune.plan import print_plan

            print_plan(cfg)
        elif mode == "validate":
            from fine_tune.validate import print_validation

            print_validation(cfg)
        elif mode == "preview":
            from fine_tune.data_preview import preview_from_config

            preview_from_config(cfg)
