"""Model architectures as configs: built from the `model.config` node for random models, or read from a
checkpoint (config.json only, no weights) so planning and validation stay cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fine_tune.errors import UserError

FAMILIES = ("mistral", "mixtral")


def config_class(family: str) -> Any:
    from transformers import MistralConfig, MixtralConfig

    try:
        return {"mistral": MistralConfig, "mixtral": MixtralConfig}[family]
    except KeyError:
        raise UserError(
            f"unknown model family '{family}'",
            where="model.family",
            hint=f"use one of {FAMILIES}, or model.init=pretrained with a checkpoint",
        ) from None


def looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def check_local_path(name_or_path: str) -> None:
    """A path that does not exist is a typo, not a hub id: say so before transformers tries the hub."""
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
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

    A random model is built from the `architecture` node (so real shapes need no hub access); a
    pretrained one reads the checkpoint's config.json. `model.config` overrides apply on top of either.
    """
    overrides = dict(overrides or {})
    if (init == "random" and architecture) or not name_or_path:
        if not architecture:
            raise UserError(
                "no architecture to build",
                where="model.architecture",
                hint="set model.name_or_path to a checkpoint, or give model.architecture",
            )
        return config_class(family)(**{**dict(architecture), **overrides})
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


def has_fused_experts(config: Any) -> bool:
    """Transformers 5 MoE models (Mixtral, Qwen-MoE ...) store experts as 3-D fused parameters."""
    return int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0) > 1


def parameter_count(config: Any) -> int:
    """Parameters of a Mistral/Mixtral-shaped model, from its config alone."""
    h, v, n = config.hidden_size, config.vocab_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    inter = config.intermediate_size
    experts = int(getattr(config, "num_local_experts", 0) or 0)
    mlp = 3 * h * inter * max(experts, 1) + (h * experts if experts else 0)
    embed = v * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return n * (attn + mlp + 2 * h) + embed + h
