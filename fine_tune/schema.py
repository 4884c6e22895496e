"""Typed schemas of the config groups, checked right after composition and before anything heavy.

Each schema is a closed structured config: an unknown key or a value of the wrong type
(`lora.r=abc`) fails with the key's full name, not deep inside PEFT or transformers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fine_tune.errors import UserError


@dataclass
class ModelSchema:
    _target_: str = "fine_tune.models.build_model"
    family: str = "mistral"
    name_or_path: str | None = None
    init: str = "pretrained"
    tokenizer: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    lr: float = 2e-4
    config: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] | None = None


@dataclass
class QuantSchema:
    _target_: str = "fine_tune.models.quant.build_quant_config"
    kind: str = "none"
    double_quant: bool = True
    compute_dtype: str = "auto"
    quant_experts: bool = True
    skip_modules: list[str] | None = None
    storage_dtype: str = "uint8"
    threshold: float = 6.0


@dataclass
class LoraSchema:
    _target_: str = "fine_tune.adapters.build_lora_config"
    _convert_: str = "all"
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    bias: str = "none"
    use_rslora: bool = False
    target_modules: Any = None  # a list of names or "all-linear"
    experts: bool = False
    expert_dropout: float = 0.0
    modules_to_save: list[str] | None = None


@dataclass
class GenerationSchema:
    num_prompts: int = 3
    max_new_tokens: int = 32


@dataclass
class CheckpointingSchema:
    mode: str = "full"
    every_n_layers: int = 1
    offload: bool = False


@dataclass
class TrainerSchema:
    _target_: str = "fine_tune.training.build_training_arguments"
    max_steps: int = -1
    num_train_epochs: float = 1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    packing: bool = False
    gradient_checkpointing: bool = False
    checkpointing: CheckpointingSchema = field(default_factory=CheckpointingSchema)
    precision: str = "auto"
    use_liger_kernel: Any = "auto"  # auto | true | false (OmegaConf has no bool | str union)
    logging_steps: int = 10
    eval_steps: int = 100
    save_steps: int = 100
    save_total_limit: int | None = 2
    dataloader_num_workers: int = 0
    torch_compile: bool = False
    generation: GenerationSchema = field(default_factory=GenerationSchema)


@dataclass
class OptimSchema:
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: dict[str, Any] = MISSING


@dataclass
class RunSchema:
    """The run-level keys, typed; registered with Hydra's ConfigStore so `seed=abc` or `plan=maybe`
    fail while the config is composed. Groups are typed by their own schemas at run start."""

    task_name: str = "train"
    seed: int = 42
    plan: bool = False
    validate: bool = False
    preview: bool = False
    resume: Any = False  # false | true | a checkpoint path (OmegaConf has no bool | str union)
    model: Any = None
    quant: Any = None
    lora: Any = None
    dataset: Any = None
    optim: Any = None
    trainer: Any = None
    logger: Any = None


def register_configs() -> None:
    """Make `fine_tune_schema/run` available to conf/config.yaml's defaults list (it is `optional`
    there, so composing without this registration, e.g. from tests, still works untyped)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="fine_tune_schema", name="run", node=RunSchema)


GROUP_SCHEMAS = {
    "model": ModelSchema,
    "quant": QuantSchema,
    "lora": LoraSchema,
    "trainer": TrainerSchema,
    "optim": OptimSchema,
}


def _explain(error: OmegaConfBaseException, group: str) -> UserError:
    key = getattr(error, "full_key", None) or ""
    where = f"{group}.{key}" if key and not key.startswith(group) else (key or group)
    first = str(error).splitlines()[0]
    return UserError(first, where=where, hint=f"check the value on the command line or in conf/{group}/")


def check_types(cfg: DictConfig) -> None:
    """Raise UserError on the first unknown key or ill-typed value in a schema'd group."""
    for group, schema in GROUP_SCHEMAS.items():
        if group not in cfg:
            raise UserError(
                f"the config has no '{group}' group",
                where=group,
                hint=f"add `- {group}: <option>` to the defaults list",
            )
        try:
            OmegaConf.merge(OmegaConf.structured(schema), cfg[group])
        except OmegaConfBaseException as error:
            raise _explain(error, group) from None
    for key, kind in (("seed", int), ("plan", bool), ("validate", bool), ("preview", bool)):
        value = cfg.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"expected {kind.__name__}, got {value!r}", where=key)
    resume = cfg.get("resume", False)
    if not isinstance(resume, (bool, str)) or resume is None:
        raise UserError(f"expected true, false or a checkpoint path, got {resume!r}", where="resume")
    unknown = sorted(set(cfg.keys()) - set(RunSchema.__dataclass_fields__) - {"hydra"})
    if unknown:
        raise UserError(
            "unknown top-level key",
            where=unknown[0],
            hint=f"top-level keys are {sorted(RunSchema.__dataclass_fields__)}; others belong in a group",
        )
