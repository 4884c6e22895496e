"""The config's one source of types, allowed values and defaults, group by group.

The YAML options show values; these dataclasses own what each key may hold and what it is when an
option leaves it out. `check_types` types every group (an unknown key, a value of the wrong type,
out of range or not among the allowed ones fails with the key's full name, not deep inside PEFT or
transformers) and completes the config in place with the defaults, so the run, the planner and the
builders all see the same values; builders take their signature defaults from here too. Checks of
one key against another are in fine_tune/validate.py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import II, MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fine_tune.errors import UserError
from fine_tune.families import families
from fine_tune.generation import DECODE

log = logging.getLogger("fine_tune")

DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
ATTENTION = ("sdpa", "varlen", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
QUANT_KINDS = ("none", "nf4", "fp4", "int8")
STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")
EXPERT_KERNELS = ("auto", "grouped", "loop")  # how 4-bit MoE experts compute (docs/speed.md, "MoE")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# lora.init_lora_weights besides `true` (PEFT's: A Kaiming-uniform, B zero); pissa_niter_<n> too
LORA_INITS = ("gaussian", "pissa", "olora", "loftq")
SKIP_MODULES = ("lm_head",)  # kept in full precision, as bitsandbytes' from_pretrained does
STRATEGIES = ("ddp", "fsdp")  # how several processes share the work (docs/scaling.md)
# dataset.template (fine_tune/data/templates.py: mistral = the variant the tokenizer's vocabulary says)
TEMPLATES = (
    "auto",
    "mistral",
    "mistral_v1",
    "mistral_v3",
    "mistral_v7",
    "chatml",
    "qa",
    "chat_template",
    "none",
)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# Keys that moved to the group that uses them; the old spelling still works, with a warning, until
# the release after 0.x (then: delete these and the `null` placeholders in conf/trainer/default.yaml).
MOVED = {"trainer.max_length": "dataset.max_length", "trainer.packing": "dataset.packing"}


def _rule(default: Any, check: Callable[[Any], bool], message: str, hint: str | None = None) -> Any:
    """A field whose values must pass `check`; `message` and `hint` make the UserError."""
    meta = {"check": check, "message": message, "hint": hint}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def one_of(default: Any, choices: tuple) -> Any:
    return _rule(default, lambda v: v in choices, f"must be one of {list(choices)}")


def positive(default: Any, hint: str | None = None) -> Any:
    return _rule(default, lambda v: v is None or v > 0, "must be positive", hint)


def at_least(default: Any, low: int, hint: str | None = None) -> Any:
    return _rule(default, lambda v: v is None or v >= low, f"must be >= {low}", hint)


def fraction(default: float) -> Any:
    return _rule(default, lambda v: 0 <= v < 1, "must be in [0, 1)")


def _lora_init(value: Any) -> bool:
    if value is True or value in LORA_INITS:
        return True
    return isinstance(value, str) and re.fullmatch(r"pissa_niter_[1-9][0-9]*", value) is not None


def _scheduler(name: str) -> bool:
    """transformers' scheduler names; its enum is consulted only for a name we do not list."""
    if name in SCHEDULERS:
        return True
    from transformers.trainer_utils import SchedulerType

    return name in {member.value for member in SchedulerType}


@dataclass
class ModelSchema:
    _target_: str = "fine_tune.models.build_model"
    family: str = one_of("mistral", tuple(families()))
    name_or_path: str | None = None
    init: str = one_of("pretrained", ("pretrained", "random"))
    tokenizer: str | None = None
    dtype: str = one_of("auto", DTYPES)
    attn_implementation: str = one_of("auto", ("auto", *ATTENTION))  # fine_tune.models.attention.resolve
    trust_remote_code: bool = False
    lr: float = 2e-4  # the suggested peak learning rate, which optim.lr follows
    config: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] | None = None


@dataclass
class QuantSchema:
    _target_: str = "fine_tune.models.quant.build_quant_config"
    kind: str = one_of("none", QUANT_KINDS)
    double_quant: bool = True
    compute_dtype: str = one_of("auto", DTYPES)
    quant_experts: bool = True
    expert_kernel: str = one_of("auto", EXPERT_KERNELS)
    skip_modules: list[str] = field(default_factory=lambda: list(SKIP_MODULES))
    storage_dtype: str = one_of("uint8", STORAGE_DTYPES)
    threshold: float = positive(6.0)
    upcast_frozen: bool = False  # PEFT's k-bit preparation: frozen norms, embeddings, LM head in fp32


@dataclass
class LoraSchema:
    _target_: str = "fine_tune.adapters.build_lora_config"
    _convert_: str = "all"
    r: int = positive(16)
    lora_alpha: float = positive(32.0)
    lora_dropout: float = fraction(0.05)
    bias: str = one_of("none", ("none", "all", "lora_only"))
    use_rslora: bool = False
    use_dora: bool = False  # DoRA: a trained magnitude per output feature (conf/lora/dora.yaml)
    # true | gaussian | pissa | pissa_niter_<n> | olora | loftq (OmegaConf has no bool | str union)
    init_lora_weights: Any = _rule(
        True, _lora_init, f"must be true or one of {[*LORA_INITS, 'pissa_niter_<n>']}", "see conf/lora/"
    )
    target_modules: Any = field(default_factory=lambda: list(LORA_TARGETS))  # names, or "all-linear"
    experts: bool = False
    expert_dropout: float = fraction(0.0)
    modules_to_save: list[str] | None = None


@dataclass
class GenerationSchema:
    num_prompts: int = at_least(3, 0)
    max_new_tokens: int = positive(32)
    decode: str = one_of("auto", DECODE)  # how samples decode: fine_tune.generation


@dataclass
class CheckpointingSchema:
    """How `trainer.gradient_checkpointing` recomputes (docs/speed.md)."""

    mode: str = one_of("full", ("full", "selective"))
    # auto: on a GPU, the fewest checkpointed layers whose memory plan fits (fine_tune.plan); N: every Nth
    every_n_layers: Any = _rule(
        "auto",
        lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "must be a positive integer or auto",
    )
    offload: bool = False


@dataclass
class FsdpSchema:
    """How `trainer.strategy=fsdp` shards (PyTorch's FSDP2, through accelerate; docs/scaling.md)."""

    # true: free each decoder layer's gathered weights after its forward and gather them again for its
    # backward (least memory); false: keep them until the backward (one all-gather less, more memory)
    reshard_after_forward: bool = True
    cpu_offload: bool = False  # the shards of weights, gradients and optimizer state wait in CPU RAM
    # true: every rank loads the model into host RAM and FSDP moves each layer's shard to its GPU as
    # it wraps it (a model larger than one GPU); false: each rank loads it whole onto its own GPU first
    load_on_cpu: bool = False


@dataclass
class TrainerSchema:
    _target_: str = "fine_tune.training.build_training_arguments"
    max_steps: int = _rule(60, lambda v: v == -1 or v > 0, "must be > 0 (or -1 to train num_train_epochs)")
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = positive(8)
    per_device_eval_batch_size: int = positive(8)
    gradient_accumulation_steps: int = positive(1)
    gradient_checkpointing: bool = False
    checkpointing: CheckpointingSchema = field(default_factory=CheckpointingSchema)
    precision: str = one_of("auto", ("auto", "bf16", "fp16", "fp32"))
    # auto | true | false (OmegaConf has no bool | str union)
    use_liger_kernel: Any = one_of("auto", ("auto", True, False))
    fused_lora: Any = one_of("auto", ("auto", True, False))  # fine_tune.training.fused_lora
    logging_steps: int = positive(5)
    eval_steps: int = positive(20)
    save_steps: int = positive(50)
    save_total_limit: int | None = positive(2)
    dataloader_num_workers: int = at_least(0, 0)
    torch_compile: bool = False
    # ddp: every process holds the whole model | fsdp: weights, gradients, optimizer state sharded
    strategy: str = one_of("ddp", STRATEGIES)
    fsdp: FsdpSchema = field(default_factory=FsdpSchema)
    generation: GenerationSchema = field(default_factory=GenerationSchema)


@dataclass
class OptimSchema:
    lr: float = positive(II("model.lr"))
    weight_decay: float = 0.0
    scheduler: str = _rule("cosine", _scheduler, "not a transformers scheduler", f"e.g. {list(SCHEDULERS)}")
    warmup_ratio: float = fraction(0.03)
    max_grad_norm: float = 0.3
    # LoRA+: B matrices at lr x this; null = off (conf/optim/loraplus.yaml)
    loraplus_lr_ratio: float | None = positive(None, "null turns LoRA+ off; the paper suggests 16")
    optimizer: dict[str, Any] = MISSING  # a `_partial_` factory: called with the trainable parameters


@dataclass
class _DataSchema:
    """What every data builder takes: sources, template, splits, caps, bad rows, length."""

    name: str | None = None  # a label for logs only
    path: Any = None  # a file, a directory, a glob or a list of them
    hub_name: str | None = None
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    file_type: str | None = None
    fields: Any = None  # field -> column name
    template: str = _rule(
        "auto", lambda v: v in TEMPLATES, f"unknown template: must be one of {list(TEMPLATES)}"
    )
    system_prompt: str | None = None
    validation_path: Any = None
    test_path: Any = None  # held-out test file(s): tokenized (never packed) into bundle.test
    validation_split: str | None = None  # hub only: e.g. "test"
    val_ratio: float = fraction(0.0)
    max_samples: int | None = positive(None)
    max_eval_samples: int | None = positive(None)
    on_bad_row: str = one_of("error", ("error", "skip"))
    truncation: str = one_of("error", ("error", "truncate", "drop"))
    num_prompts: int = at_least(4, 0)
    encoder: str = one_of("auto", ("auto", "sentencepiece", "hf"))
    max_length: int = at_least(512, 8, hint="tokens per example (and per pack): use at least 64")
    packing: bool = False  # concatenate examples padding-free


@dataclass
class DatasetSchema(_DataSchema):
    """Instruction, chat and text data for supervised fine-tuning (fine_tune/data/build.py)."""

    _target_: str = "fine_tune.data.build_data"
    format: str = "sample"
    instruction: str | None = None  # law_title: the instruction put before each question body
    train_on_inputs: bool = False
    pad_to_multiple_of: int | None = positive(None)


@dataclass
class PreferenceDatasetSchema(_DataSchema):
    """Preference pairs for DPO / ORPO (fine_tune/data/preference.py)."""

    _target_: str = "fine_tune.data.build_preference_data"
    format: str = "preference"
    # truncation=truncate: prompt tokens always kept; null: half of max_length
    max_prompt_length: int | None = positive(None)


@dataclass
class SFTMethodSchema:
    """Supervised fine-tuning (conf/method/sft.yaml): no keys of its own."""

    _target_: str = "fine_tune.training.methods.sft"


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class DPOMethodSchema:
    """Direct Preference Optimization (conf/method/dpo.yaml says what each key trades)."""

    _target_: str = "fine_tune.training.methods.dpo"
    beta: float = positive(0.1)
    loss_type: str = one_of("sigmoid", DPO_LOSSES)
    label_smoothing: float = _rule(0.0, lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")
    precompute_ref_log_probs: bool = False
    disable_dropout: bool = True


@dataclass
class ORPOMethodSchema:
    """Odds Ratio Preference Optimization (conf/method/orpo.yaml)."""

    _target_: str = "fine_tune.training.methods.orpo"
    beta: float = positive(0.1)
    disable_dropout: bool = True


@dataclass
class RunSchema:
    """The run-level keys, typed; registered with Hydra's ConfigStore so `seed=abc` or `plan=maybe`
    fail while the config is composed. Groups are typed by their own schemas at run start."""

    task_name: str = "train"
    seed: int = _rule(42, lambda v: 0 <= v < 2**32, "must be in [0, 2**32)", "numpy cannot seed with it")
    plan: bool = False
    validate: bool = False
    preview: bool = False
    resume: Any = False  # false | true | a checkpoint path (OmegaConf has no bool | str union)
    init_adapter: str | None = None  # a run dir (or adapter dir) whose adapter this run starts from
    method: Any = None
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


# The logger group has none: each tracker class is its own schema (its signature, checked by validate).
GROUP_SCHEMAS = {
    "model": ModelSchema,
    "quant": QuantSchema,
    "lora": LoraSchema,
    "trainer": TrainerSchema,
    "optim": OptimSchema,
    "dataset": DatasetSchema,
    "method": SFTMethodSchema,
}


def default(schema: type, name: str) -> Any:
    """The default of one field (for builder signatures: `r: int = default(LoraSchema, "r")`)."""
    spec = next(f for f in fields(schema) if f.name == name)
    return spec.default_factory() if spec.default is NO_DEFAULT else spec.default


def _typed(schema: type, node: Any, where: str) -> DictConfig:
    """`node` merged over `schema`: typed, closed, complete (a UserError names the key that is not)."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        key = f"{where}.{key}" if where and key and not key.startswith(where) else (key or where)
        if isinstance(error, ConfigKeyError):  # a key the schema does not have
            known = sorted(k for k in schema.__dataclass_fields__ if not k.startswith("_"))
            hint = f"the {where or 'top-level'} keys are {known}"
            raise UserError("unknown key", where=key, hint=hint) from None
        hint = f"check the value on the command line or in conf/{where}/" if where else None
        raise UserError(str(error).splitlines()[0], where=key, hint=hint) from None


def _check_values(schema: type, node: Any, where: str) -> None:
    """Each field's rule (range, allowed values), recursing into nested schemas."""
    for spec in fields(schema):
        key = f"{where}.{spec.name}" if where else spec.name
        if spec.name not in node or OmegaConf.is_missing(node, spec.name):
            continue
        value = node[spec.name]
        if is_dataclass(spec.default_factory if spec.default is NO_DEFAULT else None):
            _check_values(spec.default_factory, value, key)
        elif "check" in spec.metadata and not spec.metadata["check"](value):
            message, hint = spec.metadata["message"], spec.metadata["hint"]
            raise UserError(f"{message}, got {value!r}", where=key, hint=hint)


# Other builders a group may name, each with its own schema (the group's default is GROUP_SCHEMAS').
ALTERNATIVE_SCHEMAS = {
    "dataset": (PreferenceDatasetSchema,),
    "method": (DPOMethodSchema, ORPOMethodSchema),
}


def schema_for(group: str, node: Any) -> type | None:
    """The schema of a group node: the one whose `_target_` it names (none: the group's own); None for
    a builder we have no schema for, which is left to that builder's signature."""
    candidates = (GROUP_SCHEMAS[group], *ALTERNATIVE_SCHEMAS.get(group, ()))
    target = (node or {}).get("_target_", getattr(candidates[0], "_target_", None))
    return next((c for c in candidates if getattr(c, "_target_", None) == target), None)


def check_group(group: str, values: Mapping[str, Any]) -> dict:
    """One group's values, typed, checked and completed, as a plain dict (for builders called directly)."""
    schema = schema_for(group, values)
    typed = _typed(schema, values, group)
    _check_values(schema, typed, group)
    return OmegaConf.to_container(typed, resolve=True)


def _move_deprecated(cfg: DictConfig) -> None:
    for old, new in MOVED.items():
        (old_group, key), (group, new_key) = old.split("."), new.split(".")
        if key in cfg.get(old_group, {}):
            with open_dict(cfg):
                value = cfg[old_group].pop(key)
                if value is not None:
                    log.warning(f"{old} is deprecated (removed in the next release): use {new}")
                    cfg.setdefault(group, {})[new_key] = value


def _complete(cfg: DictConfig, partial: bool) -> list[str]:
    """Each schema'd group replaced in place by its typed, completed values, as a plain node (Hydra's
    instantiate merges the run's arguments into it: a typed node would convert them). A group whose
    builder is another `_target_` is left to that builder's signature. Returns the groups done."""
    _move_deprecated(cfg)
    done = []
    for group in GROUP_SCHEMAS:
        if group not in cfg and not partial:
            raise UserError(
                f"the config has no '{group}' group",
                where=group,
                hint=f"add `- {group}: <option>` to the defaults list",
            )
        node = cfg.get(group) or {}
        schema = schema_for(group, node)
        if schema is None:
            continue
        with open_dict(cfg):
            cfg[group] = OmegaConf.to_container(_typed(schema, node, group))  # interpolations kept
        done.append(group)
    return done


def check_types(cfg: DictConfig) -> None:
    """Type, range-check and complete every group in place; raise UserError on the first problem."""
    for group in _complete(cfg, partial=False):
        _check_values(schema_for(group, cfg[group]), cfg[group], group)
    run = _typed(RunSchema, {k: v for k, v in cfg.items() if k != "hydra"}, "")
    _check_values(RunSchema, run, "")
    if not isinstance(run.resume, (bool, str)):
        raise UserError(f"expected true, false or a checkpoint path, got {run.resume!r}", where="resume")


def complete(cfg: Any) -> dict:
    """A copy of a composed (or partial, plain) config with every group's defaults filled in, resolved,
    as plain dicts; types are checked, ranges are not (for advisory readers such as the planner)."""
    node = OmegaConf.create(OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg))
    _complete(node, partial=True)
    return OmegaConf.to_container(node, resolve=True)
