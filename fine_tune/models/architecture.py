"""Model architectures as configs: built from the `model.architecture` node for random models, or read
from a checkpoint (config.json only, no weights) so planning and validation stay cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fine_tune.errors import UserError


def check_local_path(name_or_path: str) -> None:
    """A path that does not exist is a typo, not a hub id: say so before transformers tries the hub."""
    path = Path(name_or_path).expanduser()
    if (name_or_path.startswith(("/", "./", "../", "~")) or path.exists()) and not path.is_dir():
        raise UserError(
            f"model directory '{name_or_path}' does not exist",
            where="model.name_or_path",
            hint="point it at a directory with config.json and *.safetensors, or a hub id",
        )


def load_architecture(
    family: str,
    name_or_path: str | None,
    init: str,
    architecture: dict | None,
    overrides: dict | None,
    trust_remote_code: bool = False,
) -> Any:
    """The transformers config of the model to build.

    A random model is built from the `architecture` node by its family's config class (so real
    shapes need no hub access); a pretrained one reads the checkpoint's config.json. `model.config`
    overrides apply on top of either.
    """
    from omegaconf import OmegaConf

    # transformers' strict configs want plain lists (mlp_only_layers), not OmegaConf's ListConfig
    architecture, overrides = (
        OmegaConf.to_container(OmegaConf.create(n or {}), resolve=True) for n in (architecture, overrides)
    )
    if (init == "random" and architecture) or not name_or_path:
        if not architecture:
            raise UserError(
                "no architecture to build",
                where="model.architecture",
                hint="set model.name_or_path to a checkpoint, or give model.architecture",
            )
        from fine_tune.families import get_family

        return get_family(family).config(**{**architecture, **overrides})
    check_local_path(name_or_path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot read the config of '{name_or_path}' ({type(error).__name__})",
            where="model.name_or_path",
            hint="use a local directory with config.json, or a hub id with hub access "
            "(huggingface-cli login; HF_HUB_OFFLINE unset); model=tiny_mistral needs neither",
        ) from None
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UserError(f"{type(config).__name__} has no field '{key}'", where=f"model.config.{key}")
        setattr(config, key, value)
    return config
