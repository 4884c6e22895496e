"""Validation of a composed config before anything heavy: `python -m fine_tune validate=true ...`.

Why: a typo in a key, a builder that does not take an option, experts on a dense model or a
prompt longer than max_length otherwise surface after minutes of loading (or hours, on a queue),
as a traceback from deep inside PEFT or transformers. `check_config` runs at the start of every
run (cheap: imports of the targets, no weights); `print_validation` adds what needs the tokenizer
and the data, and prints the plan of the run as a tree.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fine_tune.errors import UserError

# Arguments the run passes to each group's builder on top of the node's keys (see fine_tune/run.py).
RUNTIME_KWARGS: dict[str, dict[str, Any]] = {
    "model": {"quant": None, "seed": 0, "tokenizer": None},
    "dataset": {"tokenizer": None, "max_length": 512, "packing": False, "seed": 0, "cache_dir": None},
    "trainer": {"output_dir": "", "seed": 0, "has_eval": True, "optim": None},
}
HYDRA_KEYS = {"_target_", "_convert_", "_partial_", "_recursive_", "_args_"}
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
QUANT_KINDS = ("none", "nf4", "fp4", "int8")
LORA_BIAS = ("none", "all", "lora_only")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
LINEAR_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class Checked:
    """What validation found: targets that import and bind, and notes worth a user's attention."""

    targets: list[tuple[str, str]] = field(default_factory=list)  # (config path, target)
    notes: list[str] = field(default_factory=list)


def _plain(cfg: DictConfig) -> dict:
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as error:  # noqa: BLE001 - any resolution failure is the user's config
        key = getattr(error, "full_key", None) or "config"
        raise UserError(
            str(error).splitlines()[0],
            where=str(key),
            hint="set the value on the command line, e.g. model.name_or_path=/path",
        ) from None
    data.pop("hydra", None)
    return data


def _target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            if key not in HYDRA_KEYS:
                yield from _target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _target_nodes(value, f"{path}[{index}]")


def _locate(target: str, where: str) -> Any:
    from hydra._internal.utils import _locate as locate

    try:
        return locate(target)
    except Exception as error:  # noqa: BLE001 - ImportError, AttributeError, anything an import raises
        cause = error.__cause__ or error
        raise UserError(
            f"cannot import '{target}' ({type(cause).__name__}: {str(cause).splitlines()[0][:160]})",
            where=f"{where}._target_",
            hint="check the spelling of the class/function path, and that its package is installed",
        ) from None


def check_targets(data: dict, checked: Checked) -> None:
    """Every `_target_` imports, and its signature accepts the node's keys (nothing is called)."""
    for path, node in _target_nodes(data):
        target = str(node["_target_"])
        obj = _locate(target, path)
        kwargs = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
        group = path.split(".")[0]
        if path == group:
            kwargs = {**RUNTIME_KWARGS.get(group, {}), **kwargs}
        if path == "optim.optimizer":  # inherited AdamW keys a class cannot take are not passed
            from fine_tune.training.optim import passed_arguments

            kwargs = passed_arguments(obj, kwargs, note=False)
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):  # builtins without a signature: nothing to check
            checked.targets.append((path or "<root>", target))
            continue
        bind = signature.bind_partial if node.get("_partial_") else signature.bind
        try:
            bind(*node.get("_args_", []), **kwargs)
        except TypeError as error:
            known = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
            wrong = _unknown_key(str(error))
            raise UserError(
                f"{target} does not accept this node: {error}",
                where=f"{path}.{wrong}" if wrong else path,
                hint=f"its arguments are {known}",
            ) from None
        checked.targets.append((path or "<root>", target))


def _unknown_key(message: str) -> str | None:
    if "unexpected keyword argument" in message:
        return message.rsplit("'", 2)[-2] if message.count("'") >= 2 else None
    if "missing a required argument" in message:
        return message.rsplit("'", 2)[-2] if message.count("'") >= 2 else None
    return None


def _is_moe(model: dict) -> bool:
    arch = {**(model.get("architecture") or {}), **(model.get("config") or {})}
    name = model.get("name_or_path")
    if name and model.get("init") == "pretrained":
        config_json = Path(str(name)).expanduser() / "config.json"
        if config_json.is_file():
            import json

            arch = {**json.loads(config_json.read_text()), **(model.get("config") or {})}
    experts = int(arch.get("num_local_experts") or arch.get("num_experts") or 0)
    return experts > 1 or (not arch and model.get("family") == "mixtral")


def _positive(data: dict, checks: list[tuple[str, str]]) -> None:
    for group, key in checks:
        value = data[group].get(key)
        if value is not None and value <= 0:
            raise UserError(f"must be positive, got {value}", where=f"{group}.{key}")


def cross_checks(data: dict, checked: Checked) -> None:
    """Combinations that are each valid alone but not together, and values out of range."""
    model, quant, lora, trainer, optim = (data[k] for k in ("model", "quant", "lora", "trainer", "optim"))
    _positive(
        data,
        [
            ("lora", "r"),
            ("lora", "lora_alpha"),
            ("trainer", "per_device_train_batch_size"),
            ("trainer", "per_device_eval_batch_size"),
            ("trainer", "gradient_accumulation_steps"),
            ("trainer", "max_length"),
            ("trainer", "logging_steps"),
            ("trainer", "eval_steps"),
            ("trainer", "save_steps"),
        ],
    )
    if not 0 <= float(lora.get("lora_dropout") or 0) < 1:
        raise UserError(f"must be in [0, 1), got {lora['lora_dropout']}", where="lora.lora_dropout")
    max_steps, epochs = trainer.get("max_steps", -1), trainer.get("num_train_epochs", 1)
    if max_steps == 0 or max_steps < -1:
        raise UserError(
            f"must be > 0 (or -1 to train num_train_epochs), got {max_steps}", where="trainer.max_steps"
        )
    if max_steps == -1 and not epochs > 0:
        raise UserError(f"must be > 0 when max_steps is -1, got {epochs}", where="trainer.num_train_epochs")
    if trainer.get("precision") not in PRECISIONS:
        raise UserError(
            f"unknown precision {trainer.get('precision')!r}",
            where="trainer.precision",
            hint=f"use one of {PRECISIONS}",
        )
    if model.get("dtype") not in DTYPES:
        raise UserError(
            f"unknown dtype {model.get('dtype')!r}", where="model.dtype", hint=f"use one of {DTYPES}"
        )
    if model.get("attn_implementation") not in ATTENTION:
        raise UserError(
            f"unknown attention implementation {model.get('attn_implementation')!r}",
            where="model.attn_implementation",
            hint=f"use one of {ATTENTION}",
        )
    if model.get("init") not in ("random", "pretrained"):
        raise UserError(f"unknown init {model.get('init')!r}", where="model.init", hint="random | pretrained")
    if model.get("family") not in ("mistral", "mixtral") and model.get("init") == "random":
        raise UserError(
            f"unknown model family {model.get('family')!r}",
            where="model.family",
            hint="mistral | mixtral (or init=pretrained with a checkpoint)",
        )
    name = model.get("name_or_path")
    if name:
        from fine_tune.models.architecture import check_local_path

        check_local_path(str(name))
    elif model.get("init") == "pretrained":
        raise UserError(
            "init=pretrained needs a checkpoint",
            where="model.name_or_path",
            hint="set model.name_or_path, or model.init=random",
        )
    if model.get("trust_remote_code"):
        checked.notes.append("model.trust_remote_code=true: code from the model repository will run")

    seed = data.get("seed")
    if isinstance(seed, int) and not 0 <= seed < 2**32:
        raise UserError(f"must be in [0, 2**32), got {seed}", where="seed", hint="numpy cannot seed with it")
    if int(trainer.get("dataloader_num_workers") or 0) < 0:
        raise UserError("must be >= 0", where="trainer.dataloader_num_workers")
    if lora.get("bias") not in LORA_BIAS:
        raise UserError(
            f"unknown bias mode {lora.get('bias')!r}", where="lora.bias", hint=f"use one of {LORA_BIAS}"
        )
    _check_scheduler(optim.get("scheduler"))
    _check_architecture(model, trainer, checked)

    kind = quant.get("kind")
    if kind != "none" and quant.get("compute_dtype", "auto") not in DTYPES:
        raise UserError(
            f"unknown compute dtype {quant.get('compute_dtype')!r}",
            where="quant.compute_dtype",
            hint=f"use one of {DTYPES}",
        )
    if kind not in QUANT_KINDS:
        raise UserError(
            f"unknown quantization {kind!r}", where="quant.kind", hint=f"use one of {QUANT_KINDS}"
        )
    cuda = _LazyCuda()  # torch is imported only when a check needs to know
    if kind != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(
                f"quant={kind} needs bitsandbytes",
                where="quant.kind",
                hint="pip install bitsandbytes, or quant=none",
            )
        if not cuda:
            checked.notes.append(
                f"quant={kind} on CPU: bitsandbytes runs it, but slowly (fine for tiny models)"
            )

    precision = trainer.get("precision")
    if precision == "bf16" or model.get("dtype") in ("bfloat16", "bf16"):
        if cuda and not _bf16_supported():
            raise UserError(
                "this GPU does not support bf16",
                where="trainer.precision",
                hint="use trainer.precision=fp16 and model.dtype=float16, or auto",
            )
        if not cuda:
            checked.notes.append("bf16 requested on CPU: training runs in fp32 (exact, faster on CPU)")
    if precision == "fp16" and not cuda:
        checked.notes.append("fp16 requested on CPU: training runs in fp32")

    if lora.get("experts"):
        if not _is_moe(model):
            raise UserError(
                "lora.experts=true but this model has no experts",
                where="lora.experts",
                hint="use it with model=mixtral / tiny_mixtral, or set lora.experts=false",
            )
        if kind not in ("nf4", "fp4") or not quant.get("quant_experts", True):
            raise UserError(
                "expert adapters train on 4-bit experts",
                where="lora.experts",
                hint="use quant=nf4 (with quant.quant_experts=true), or lora.experts=false",
            )

    wrapped = kind not in ("nf4", "fp4") or not quant.get("quant_experts", True)
    moe_all_linear = lora.get("target_modules") == "all-linear" and _is_moe(model) and wrapped
    if moe_all_linear and float(lora.get("lora_dropout") or 0) > 0:
        raise UserError(
            "all-linear on an MoE model adapts the fused expert tensors, which take no dropout",
            where="lora.lora_dropout",
            hint="set lora.lora_dropout=0 (lora=all does), or list target_modules explicitly",
        )

    attn = model.get("attn_implementation")
    if attn in ("flash_attention_2", "flash_attention_3"):
        package = "flash_attn" if attn == "flash_attention_2" else "flash_attn_interface"
        if importlib.util.find_spec(package) is None or not cuda:
            raise UserError(
                f"{attn} needs a GPU and the {package} package",
                where="model.attn_implementation",
                hint="use sdpa (packing works with it too)",
            )
    if trainer.get("packing") and attn == "eager":
        checked.notes.append("packing with eager attention builds a full mask per pack: sdpa is faster")

    target = str((optim.get("optimizer") or {}).get("_target_", ""))
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if "Paged" in target and fsdp:
        raise UserError(
            "paged optimizers do not work with FSDP",
            where="optim.optimizer._target_",
            hint="use optim=adamw_torch with FSDP",
        )
    if ("bitsandbytes" in target) and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{target} needs bitsandbytes", where="optim.optimizer._target_")
    if not 0 <= float(optim.get("warmup_ratio") or 0) < 1:
        raise UserError(f"must be in [0, 1), got {optim['warmup_ratio']}", where="optim.warmup_ratio")
    if float(optim.get("lr") or 0) <= 0:
        raise UserError(f"must be positive, got {optim.get('lr')}", where="optim.lr")

    dataset = data.get("dataset") or {}
    if dataset.get("_target_") == "fine_tune.data.build_data":
        from fine_tune.data.build import OPTIONS

        unknown = sorted(set(dataset) - set(OPTIONS) - HYDRA_KEYS)
        if unknown:
            raise UserError(
                "unknown dataset option",
                where=f"dataset.{unknown[0]}",
                hint=f"known options: {sorted(OPTIONS)}",
            )
    for key in ("path", "validation_path"):
        for item in _as_list(dataset.get(key)):
            if not any(ch in str(item) for ch in "*?[") and not Path(str(item)).expanduser().exists():
                raise UserError(
                    f"data file '{item}' does not exist",
                    where=f"dataset.{key}",
                    hint="give a file, directory or glob; relative paths start at the launch dir",
                )

    resume = data.get("resume")
    named = isinstance(resume, str) and resume.lower() not in ("true", "false", "latest", "")
    if named and not Path(resume).expanduser().exists():
        raise UserError(
            f"checkpoint '{resume}' does not exist",
            where="resume",
            hint="resume=true continues this run dir's latest checkpoint",
        )


def _check_scheduler(name: Any) -> None:
    """transformers' scheduler names; its enum is consulted only for a name we do not know."""
    if name in SCHEDULERS:
        return
    from transformers.trainer_utils import SchedulerType

    known = [member.value for member in SchedulerType]
    if name not in known:
        raise UserError(f"unknown scheduler {name!r}", where="optim.scheduler", hint=f"use one of {known}")


def _check_architecture(model: dict, trainer: dict, checked: Checked) -> None:
    """Shapes that transformers would reject with a traceback, or that training cannot use."""
    arch = {**(model.get("architecture") or {}), **(model.get("config") or {})}
    heads, kv = arch.get("num_attention_heads"), arch.get("num_key_value_heads")
    if heads and kv and (kv <= 0 or heads % kv):
        raise UserError(
            f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})",
            where="model.architecture.num_key_value_heads",
        )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key in arch and arch[key] is not None and int(arch[key]) <= 0:
            raise UserError(f"must be positive, got {arch[key]}", where=f"model.architecture.{key}")
    positions = arch.get("max_position_embeddings")
    if positions and int(trainer.get("max_length") or 0) > int(positions):
        checked.notes.append(
            f"trainer.max_length {trainer['max_length']} exceeds the model's {positions} positions"
        )


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _LazyCuda:
    """Truthy when a GPU is there; asks torch (seconds to import) only when first evaluated."""

    _value: bool | None = None

    def __bool__(self) -> bool:
        if self._value is None:
            self._value = _has_cuda()
        return self._value


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    from fine_tune.hardware import has_cuda

    return has_cuda()


def _bf16_supported() -> bool:
    from fine_tune.hardware import bf16_supported

    return bf16_supported()


def check_config(cfg: DictConfig) -> Checked:
    """Types, targets and cross-checks of the composed config; raises UserError on the first problem."""
    from fine_tune.schema import check_types
    from fine_tune.secrets import check_no_secrets

    check_types(cfg)
    data = _plain(cfg)
    check_no_secrets(data)
    checked = Checked()
    cross_checks(data, checked)
    check_targets(data, checked)
    return checked


# ------------------------------------------------------------------------------------------------
# The plan of the run: parameter counts from the architecture, analytic LoRA size, data, steps.


def shapes_of(model: dict) -> Any:
    """Model shapes without weights (config.json of a local checkpoint, or the architecture node)."""
    from fine_tune.plan import model_shapes

    return model_shapes(model)


def parameter_counts(shapes: Any, lora: dict, fused_experts_wrapped: bool = True) -> tuple[int, int]:
    """(total base parameters, trainable LoRA parameters), computed from the shapes alone.

    Mirrors what PEFT creates: r * (in + out) per adapted linear, per layer; expert adapters add
    r * (in + out) per expert and fused tensor (gate_up_proj: h -> 2*inter, down_proj: inter -> h).
    `fused_experts_wrapped`: the experts stay bf16 tensors (not 4-bit), which PEFT's all-linear adapts.
    Mistral/Mixtral linears have no bias, so `lora.bias` adds nothing.
    """
    h, inter, n = shapes.hidden_size, shapes.intermediate_size, shapes.num_hidden_layers
    head, heads, kv = shapes.head_dim, shapes.num_attention_heads, shapes.num_key_value_heads
    experts = int(getattr(shapes, "num_local_experts", 0) or 0)
    moe = experts > 1
    dims = {
        "q_proj": (h, heads * head),
        "k_proj": (h, kv * head),
        "v_proj": (h, kv * head),
        "o_proj": (heads * head, h),
    }
    if moe:
        dims["gate"] = (h, experts)  # the router
    else:
        dims.update({"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)})
    attn = sum(i * o for k, (i, o) in dims.items() if k in LINEAR_ATTN)
    mlp = 3 * h * inter * (experts if moe else 1) + (h * experts if moe else 0)
    embed = shapes.vocab_size * h * (1 if shapes.tie_word_embeddings else 2)
    total = n * (attn + mlp + 2 * h) + embed + h
    targets = lora.get("target_modules") or []
    names = set(dims) if targets == "all-linear" else {str(t) for t in _as_list(targets)}
    r = int(lora["r"])
    trainable = n * sum(r * (i + o) for k, (i, o) in dims.items() if k in names)
    if lora.get("experts") and moe:
        trainable += n * experts * r * ((h + 2 * inter) + (inter + h))
    if fused_experts_wrapped and moe and targets == "all-linear":
        # PEFT's ParamWrapper on the fused bf16 experts: rank r per expert, twice for gate_up_proj.
        rank = r * experts
        trainable += n * (2 * rank * h + 2 * inter * 2 * rank + rank * inter + h * rank)
    return total, trainable


def planned_steps(trainer: dict, train_rows: int) -> tuple[int, float]:
    """(optimizer steps, epochs they cover) as the Trainer will compute them, on one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_step = trainer["per_device_train_batch_size"] * trainer["gradient_accumulation_steps"] * world
    steps_per_epoch = max(math.ceil(train_rows / per_step), 1) if train_rows else 1
    if trainer.get("max_steps", -1) > 0:
        steps = int(trainer["max_steps"])
    else:
        steps = math.ceil(float(trainer["num_train_epochs"]) * steps_per_epoch)
    return steps, steps / steps_per_epoch


def check_prompts(bundle: Any, max_length: int) -> None:
    """Held-out prompts must leave room for an answer inside max_length (the model never saw more)."""
    longest = max((len(p["prompt_ids"]) for p in bundle.prompts), default=0)
    if longest >= max_length:
        raise UserError(
            f"the longest prompt has {longest} tokens, not less than max_length {max_length}",
            where="trainer.max_length",
            hint="raise trainer.max_length, or shorten the prompts",
        )


def print_validation(cfg: DictConfig) -> None:
    """Validate everything that can be checked without weights, then print the plan of the run."""
    from rich.console import Console
    from rich.tree import Tree

    checked = check_config(cfg)
    data = _plain(cfg)
    model, lora, trainer, quant, optim = (data[k] for k in ("model", "lora", "trainer", "quant", "optim"))
    tree = Tree("[bold]fine_tune run plan[/bold] (validate=true: nothing was trained, no weights loaded)")

    built = instantiate_light(cfg)
    node = tree.add(
        f"[bold]checks[/bold]: {len(checked.targets)} targets import and accept their keys; "
        f"built without weights: {', '.join(built)}"
    )
    for path, target in checked.targets:
        node.add(f"{path}: {target}")

    try:
        shapes = shapes_of(model)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - a hub lookup without network: say so, go on
        shapes = None
        checked.notes.append(f"model shapes unavailable ({type(error).__name__}); parameter counts skipped")
    node = tree.add(
        f"[bold]model[/bold]: {model.get('name_or_path') or model['family']} "
        f"(init {model['init']}, dtype {model['dtype']}, attention {model['attn_implementation']})"
    )
    trainable = total = None
    if shapes is not None:
        wrapped = quant["kind"] not in ("nf4", "fp4") or not quant.get("quant_experts", True)
        total, trainable = parameter_counts(shapes, lora, fused_experts_wrapped=wrapped)
        experts = getattr(shapes, "num_local_experts", 0) or 0
        node.add(
            f"{shapes.num_hidden_layers} layers, hidden {shapes.hidden_size}, "
            f"vocab {shapes.vocab_size}" + (f", {experts} experts" if experts > 1 else "")
        )
        node.add(f"parameters: {total:,}")
    node.add(f"quantization: {quant['kind']}")
    targets = lora.get("target_modules")
    node = tree.add(
        f"[bold]adapter[/bold]: LoRA r={lora['r']} alpha={lora['lora_alpha']} "
        f"on {targets}" + (" + experts" if lora.get("experts") else "")
    )
    if trainable is not None and total:
        node.add(f"trainable parameters: {trainable:,} ({100 * trainable / total:.3f}%)")

    bundle = _build_data(cfg)
    check_prompts(bundle, int(trainer["max_length"]))
    node = tree.add("[bold]data[/bold]")
    for line in bundle.report.format().splitlines():
        node.add(line.strip())
    node.add(
        f"{len(bundle.prompts)} held-out prompts for samples; longest "
        f"{max((len(p['prompt_ids']) for p in bundle.prompts), default=0)} tokens"
    )

    steps, epochs = planned_steps(trainer, len(bundle.train))
    effective = trainer["per_device_train_batch_size"] * trainer["gradient_accumulation_steps"]
    node = tree.add(
        f"[bold]training[/bold]: {steps} steps ({epochs:.2f} epochs), effective batch {effective}, "
        f"max_length {trainer['max_length']}, precision {trainer['precision']}"
    )
    node.add(f"optimizer {optim['optimizer']['_target_']}, lr {optim['lr']}, scheduler {optim['scheduler']}")
    node.add(
        f"eval every {trainer['eval_steps']} steps, checkpoint every {trainer['save_steps']} "
        f"(keep {trainer['save_total_limit']}), resume={data.get('resume')}"
    )

    memory = tree.add("[bold]memory[/bold]")
    try:
        from fine_tune.plan import plan_memory

        plan = plan_memory(cfg)
        memory.add(f"expected GPU memory: {plan.device_bytes() / 2**30:.2f} GiB ({plan.description})")
    except ImportError:
        memory.add("no planner installed (fine_tune.plan)")
    except Exception as error:  # noqa: BLE001 - the planner is advisory here
        memory.add(f"planner could not estimate this run ({str(error).splitlines()[0][:120]})")

    if checked.notes:
        node = tree.add("[bold yellow]notes[/bold yellow]")
        for note in checked.notes:
            node.add(note)
    Console().print(tree)
    print("validation passed")


def instantiate_light(cfg: DictConfig) -> list[str]:
    """Build every object that holds no weights, so their own validation runs too (PEFT's LoraConfig,
    BitsAndBytesConfig, TrainingArguments, the optimizer factory, the tracker; nothing is started)."""
    import tempfile

    from fine_tune.utils.build import build

    build(cfg.lora)
    build(cfg.quant)
    with tempfile.TemporaryDirectory() as tmp:
        build(
            cfg.trainer,
            output_dir=tmp,
            seed=cfg.seed,
            has_eval=True,
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            _convert_="all",
        )
    from fine_tune.training.optim import build_optimizer_factory

    build_optimizer_factory(cfg.optim.optimizer)
    build(cfg.logger)
    return ["lora", "quant", "trainer", "optim.optimizer", "logger"]


def _build_data(cfg: DictConfig) -> Any:
    from fine_tune.run import build_data, build_tokenizer, quiet_libraries

    quiet_libraries()
    tokenizer = build_tokenizer(cfg)
    return build_data(cfg, tokenizer, Path("."))
