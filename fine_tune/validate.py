"""Validation of a composed config before anything heavy: `python -m fine_tune validate=true ...`.

Why: a typo in a key, a builder that does not take an option, experts on a dense model or a
prompt longer than max_length otherwise surface after minutes of loading (or hours, on a queue),
as a traceback from deep inside PEFT or transformers. Each key's type, range and allowed values
are the schema's (fine_tune/schema.py); this module holds the checks of keys against each other
and against the machine. `check_config` runs at the start of every run (cheap: imports of the
targets, no weights); `print_validation` adds what needs the tokenizer and the data, and prints
the plan of the run as a tree.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fine_tune.distributed import effective_batch
from fine_tune.errors import UserError

HYDRA_KEYS = {"_target_", "_convert_", "_partial_", "_recursive_", "_args_"}


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
    """Every `_target_` imports, and its signature accepts the node's keys (nothing is called).

    Arguments the node leaves out are not asked for: the run passes some (the tokenizer, the seed)
    when it builds, so only a key the builder does not take is an error (as torchtune validates).
    """
    for path, node in _target_nodes(data):
        target = str(node["_target_"])
        obj = _locate(target, path)
        kwargs = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
        if path == "optim.optimizer":  # inherited AdamW keys a class cannot take are not passed
            from fine_tune.training.optim import passed_arguments

            kwargs = passed_arguments(obj, kwargs, note=False)
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):  # builtins without a signature: nothing to check
            checked.targets.append((path or "<root>", target))
            continue
        try:
            signature.bind_partial(*node.get("_args_", []), **kwargs)
        except TypeError as error:
            known = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
            wrong = str(error).rsplit("'", 2)[-2] if "unexpected keyword" in str(error) else None
            raise UserError(
                f"{target} does not accept this node: {error}",
                where=f"{path}.{wrong}" if wrong else path,
                hint=f"its arguments are {known}",
            ) from None
        checked.targets.append((path or "<root>", target))


def cross_checks(data: dict, checked: Checked) -> None:
    """Combinations that are each valid alone but not together, or not on this machine."""
    model, quant, lora, trainer, optim, dataset = (
        data[k] for k in ("model", "quant", "lora", "trainer", "optim", "dataset")
    )
    if trainer["max_steps"] == -1 and not trainer["num_train_epochs"] > 0:
        raise UserError(
            f"must be > 0 when max_steps is -1, got {trainer['num_train_epochs']}",
            where="trainer.num_train_epochs",
        )
    _check_model(model, dataset, checked)
    from fine_tune.families.shapes import model_shapes

    shapes = model_shapes(model, hub=False)
    cuda = _LazyCuda()  # torch is imported only when a check needs to know
    kind = quant["kind"]
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

    precision = trainer["precision"]
    if precision == "bf16" or model["dtype"] in ("bfloat16", "bf16"):
        from fine_tune.hardware import bf16_supported

        if cuda and not bf16_supported():
            raise UserError(
                "this GPU does not support bf16",
                where="trainer.precision",
                hint="use trainer.precision=fp16 and model.dtype=float16, or auto",
            )
        if not cuda:
            checked.notes.append("bf16 requested on CPU: training runs in fp32 (exact, faster on CPU)")
    if precision == "fp16" and not cuda:
        checked.notes.append("fp16 requested on CPU: training runs in fp32")

    _check_experts(shapes, quant, lora)
    _check_lora_targets(lora)
    _check_variant(shapes, model, quant, lora, checked)

    attn = model["attn_implementation"]
    if attn in ("flash_attention_2", "flash_attention_3"):
        package = "flash_attn" if attn == "flash_attention_2" else "flash_attn_interface"
        if importlib.util.find_spec(package) is None or not cuda:
            raise UserError(
                f"{attn} needs a GPU and the {package} package",
                where="model.attn_implementation",
                hint="use sdpa (packing works with it too)",
            )
    if attn == "flex_attention" and not cuda:
        raise UserError(
            "flex_attention trains on a GPU only (torch has no FlexAttention backward on CPU)",
            where="model.attn_implementation",
            hint="use sdpa on CPU",
        )
    if attn == "varlen" and not (cuda and importlib.util.find_spec("torch.nn.attention.varlen")):
        checked.notes.append("varlen attention needs a CUDA GPU and PyTorch >= 2.10: attention runs by sdpa")
    if attn == "varlen" and not dataset.get("packing"):
        checked.notes.append("varlen attention speeds up packed rows only (dataset.packing=true)")
    if dataset.get("packing") and attn == "eager":
        checked.notes.append("packing with eager attention builds a full mask per pack: sdpa is faster")

    target = str((optim.get("optimizer") or {}).get("_target_", ""))
    _check_strategy(data, shapes, checked, cuda, target)
    if ("bitsandbytes" in target) and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{target} needs bitsandbytes", where="optim.optimizer._target_")

    for key in ("path", "validation_path"):
        value = dataset[key]
        for item in value if isinstance(value, list) else [value] if value else []:
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
    _check_method(data.get("method") or {})
    if data.get("init_adapter"):
        _check_init_adapter(data, checked)
    _check_data(data)


def _check_method(method: dict) -> None:
    """Method keys that only mean something together."""
    if method.get("label_smoothing") and method.get("loss_type") != "robust":
        raise UserError(
            f"label_smoothing is read by loss_type=robust only (TRL 1.16's {method.get('loss_type')} "
            "loss ignores it)",
            where="method.label_smoothing",
            hint="set method.loss_type=robust, or method.label_smoothing=0",
        )


def _check_data(data: dict) -> None:
    """The dataset node against its builder and the method. The rules are the functions below, which
    the data builders (`check_dataset`: they may be called directly) and `Recipe.data`
    (`check_method_data`, on the built bundle's kind) call too."""
    from fine_tune.data.formats import BUILDERS
    from fine_tune.schema import schema_for
    from fine_tune.training.methods import method_of

    dataset, method = data["dataset"], data.get("method")
    kind = next((k for k, target in BUILDERS.items() if target == dataset.get("_target_")), None)
    if kind is not None:  # None: a builder fine_tune does not ship, whose bundle says
        check_dataset(dataset, kind)
    if not method or schema_for("method", method) is not None:  # ours: checked values, built cheaply
        check_method_data(method_of(method), kind, dataset)


def check_dataset(dataset: Mapping, kind: str) -> None:
    """The dataset node's keys (completed by its schema) against each other and against its builder,
    the one that gives `kind` data."""
    from fine_tune.data.formats import BUILDERS, DEFAULT_FIELDS, SAMPLE, format_names, get_format
    from fine_tune.data.preference import KIND, prompt_budget

    pairs = kind == KIND
    if pairs and dataset["packing"]:
        raise UserError(
            "packing does not apply to preference pairs (each pair is its own chosen and rejected row)",
            where="dataset.packing",
            hint="set dataset.packing=false",
        )
    if pairs and prompt_budget(dataset) >= dataset["max_length"]:
        raise UserError(
            f"max_prompt_length={prompt_budget(dataset)} leaves no room for the answers within "
            f"max_length={dataset['max_length']}",
            where="dataset.max_prompt_length",
            hint="use a value below max_length (null: half of it)",
        )
    name, names = dataset["format"], format_names(kind)
    fmt = get_format(name, kind)
    if fmt is None:
        raise UserError(
            f"unknown dataset format {name!r}", where="dataset.format", hint=f"use one of {names}"
        )
    if fmt.kind != kind:
        raise UserError(
            f"format {name!r} is {fmt.kind} data, which {BUILDERS[kind]} does not read",
            where="dataset.format",
            hint=f"use a dataset option whose _target_ is {BUILDERS[fmt.kind]} "
            f"({'dataset=preference' if fmt.kind == KIND else 'dataset=local'}), "
            f"or one of {names}",
        )
    if not (dataset["path"] or dataset["hub_name"] or name == SAMPLE):  # the sample is shipped
        raise UserError(
            f"format {name!r} needs data: set dataset.path (local file) or dataset.hub_name",
            where="dataset.path",
            hint="e.g. dataset.path=/data/train.jsonl",
        )
    for key in dataset.get("fields") or {}:
        if key not in DEFAULT_FIELDS[fmt.name]:
            raise UserError(
                f"format {fmt.name!r} has no field {key!r}",
                where=f"dataset.fields.{key}",
                hint=f"remappable fields: {sorted(DEFAULT_FIELDS[fmt.name])}",
            )
    if pairs and dataset["template"] == "none":
        raise UserError(
            "template none (raw text) has no prompt / answer turns to prefer between",
            where="dataset.template",
            hint="use dataset.template=auto",
        )


def check_method_data(method: Any, kind: str | None, dataset: Mapping) -> None:
    """A method trains on one kind of data (`Method.data_kind`); `kind`: what the dataset gives, by its
    builder (before anything loads) or by the built bundle (None: not known yet)."""
    if kind is None or kind == method.data_kind:
        return
    kinds = {"sft": "instruction, chat or text examples", "preference": "preference pairs"}
    raise UserError(
        f"method={method.name} trains on {kinds[method.data_kind]}, but dataset "
        f"{dataset.get('name') or dataset.get('format')} gives {kinds.get(kind, kind)}",
        where="method",
        hint="pick a dataset of that kind, or method=sft for instruction data and method=dpo or "
        "method=orpo for preference pairs",
    )


def _check_init_adapter(data: dict, checked: Checked) -> None:
    """The adapter a run starts from must fit its `lora` settings and its base model."""
    from fine_tune.adapters import ADAPTER_CONFIG
    from fine_tune.recipe import init_adapter_dir
    from fine_tune.run_dir import saved_config
    from fine_tune.training.checkpoints import adapter_mismatch
    from fine_tune.utils.io import read_json

    directory = init_adapter_dir(data["init_adapter"])
    saved = read_json(directory / ADAPTER_CONFIG) or {}
    experts = bool(saved.get("target_parameters"))
    mismatch = adapter_mismatch(saved, data["lora"]) or (
        ("experts", experts, data["lora"]["experts"]) if experts != bool(data["lora"]["experts"]) else None
    )
    if mismatch:
        key, was, wanted = mismatch
        raise UserError(
            f"the adapter in {directory} has {key}={was}, the config says lora.{key}={wanted}",
            where=f"lora.{key}",
            hint="init_adapter continues that adapter: set the lora group as the run that trained it did",
        )
    run_config = saved_config(directory.parent)
    if not run_config.is_file():
        checked.notes.append(f"init_adapter {directory}: no run config beside it, base model not compared")
        return
    trained = OmegaConf.to_container(OmegaConf.load(run_config), resolve=True)
    model = data["model"]
    for key in ("family", "name_or_path", "init", "architecture"):
        if trained["model"].get(key) != model.get(key):
            raise UserError(
                f"the adapter in {directory} was trained on another base model (model.{key}: "
                f"{trained['model'].get(key)!r}, here {model.get(key)!r})",
                where="init_adapter",
                hint="use the model group of the run that trained it",
            )
    if model["init"] == "random" and trained.get("seed") != data["seed"]:
        raise UserError(
            f"the adapter in {directory} was trained on random weights of seed {trained.get('seed')}, "
            f"this run's are seed {data['seed']}",
            where="seed",
            hint=f"seed={trained.get('seed')}",
        )


def _check_model(model: dict, dataset: dict, checked: Checked) -> None:
    """The checkpoint or the architecture: shapes transformers would reject with a traceback."""
    name = model.get("name_or_path")
    if name:
        from fine_tune.models.architecture import check_local_path

        check_local_path(str(name))
    elif model["init"] == "pretrained":
        raise UserError(
            "init=pretrained needs a checkpoint",
            where="model.name_or_path",
            hint="set model.name_or_path, or model.init=random",
        )
    if model["trust_remote_code"]:
        checked.notes.append("model.trust_remote_code=true: code from the model repository will run")
    arch = {**(model.get("architecture") or {}), **(model.get("config") or {})}
    heads, kv = arch.get("num_attention_heads"), arch.get("num_key_value_heads")
    if heads and kv and (kv <= 0 or heads % kv):
        raise UserError(
            f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})",
            where="model.architecture.num_key_value_heads",
        )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if arch.get(key) is not None and int(arch[key]) <= 0:
            raise UserError(f"must be positive, got {arch[key]}", where=f"model.architecture.{key}")
    positions = arch.get("max_position_embeddings")
    if positions and dataset["max_length"] > int(positions):
        checked.notes.append(
            f"dataset.max_length {dataset['max_length']} exceeds the model's {positions} positions"
        )


def _check_experts(shapes: Any, quant: dict, lora: dict) -> None:
    """LoRA on experts needs experts; PEFT's all-linear on the router takes no dropout."""
    from fine_tune.families.shapes import experts_in_4bit, peft_remaps

    four_bit = experts_in_4bit(shapes, quant)
    if lora["experts"] and not shapes.moe:
        raise UserError(
            "lora.experts=true but this model has no experts",
            where="lora.experts",
            hint="use an MoE model (model=mixtral, tiny_mixtral, qwen2_moe), or set lora.experts=false",
        )
    # 4-bit experts take our expert LoRA; bf16 experts (quant=none, or quant_experts=false) PEFT's
    # target_parameters, at rank r per expert. Next to int8 layers that has never been run.
    if lora["experts"] and not four_bit and quant["kind"] == "int8":
        raise UserError(
            "expert adapters are not supported next to int8 layers",
            where="lora.experts",
            hint="use quant=nf4 (experts in 4 bits too) or quant=none (bf16 experts), or lora.experts=false",
        )
    if peft_remaps(shapes, lora) and lora["lora_dropout"] > 0:
        raise UserError(
            "all-linear on this MoE model adapts the router as a bare parameter, which takes no dropout",
            where="lora.lora_dropout",
            hint="set lora.lora_dropout=0 (lora=all does), or list target_modules explicitly",
        )


def _check_lora_targets(lora: dict) -> None:
    """LoRA on the output layer would never train: TRL's loss (its fused LM head) multiplies the hidden
    states by `lm_head.weight` itself. TRL refuses it too, but only after the model has loaded."""
    targets = lora["target_modules"]
    if "lm_head" in ([targets] if isinstance(targets, str) else targets or []):
        raise UserError(
            "LoRA on lm_head would never be trained: the loss reads lm_head.weight directly",
            where="lora.target_modules",
            hint="remove lm_head from lora.target_modules, or train the whole head with "
            "lora.modules_to_save=[lm_head]",
        )


def _check_variant(shapes: Any, model: dict, quant: dict, lora: dict, checked: Checked) -> None:
    """DoRA and the initialisations (conf/lora/*.yaml): refused where PEFT cannot apply them, where
    the saved adapter could not reproduce the trained model, or where they need what is missing."""
    from fine_tune.adapters import changes_base
    from fine_tune.families.shapes import parameter_counts, peft_remaps
    from fine_tune.models.loading import MATERIALISE_LIMIT

    init, dora, kind = lora["init_lora_weights"], lora["use_dora"], quant["kind"]
    if not dora and init is True:
        return
    where = "lora.use_dora" if dora else "lora.init_lora_weights"
    name = "DoRA" if dora else f"init_lora_weights={init}"
    if dora and init not in (True, "gaussian"):
        raise UserError(
            f"DoRA with init_lora_weights={init}: one variant at a time",
            where=where,
            hint="sweep them as separate options, e.g. -m lora=dora,pissa",
        )
    if lora["experts"]:
        raise UserError(
            f"{name} applies to PEFT's adapters only; fine_tune's 4-bit expert adapters are plain LoRA",
            where=where,
            hint=f"lora.experts=false ({name} on attention and MLP), or lora=attn_experts without {name}",
        )
    if peft_remaps(shapes, lora):
        raise UserError(
            f"all-linear on this MoE model adapts the router as a bare parameter, which takes no {name}",
            where=where,
            hint="list target_modules, e.g. [q_proj,k_proj,v_proj,o_proj]",
        )
    if changes_base(init) and kind != "none":
        why = (
            "PEFT computes PiSSA's SVD on float weights only"
            if str(init).startswith("pissa")
            else "OLoRA would re-quantize the residual base, so no base users can load would reproduce "
            "the trained model"
        )
        raise UserError(
            f"init_lora_weights={init} on a quant={kind} base: {why}",
            where=where,
            hint="quant=none, or lora=loftq (the initialisation made for 4-bit bases)",
        )
    if init == "loftq" and kind not in ("nf4", "fp4"):
        raise UserError(
            f"LoftQ starts the adapter from the error of 4-bit quantization, and quant={kind}",
            where=where,
            hint="quant=nf4, or lora=pissa / lora=default without quantization",
        )
    built_on_device = parameter_counts(shapes).total > MATERIALISE_LIMIT
    if init == "loftq" and model["init"] == "random" and built_on_device:
        raise UserError(
            "LoftQ reads the full-precision weights from the checkpoint; model.init=random at real "
            "shapes is built on the GPU and keeps none",
            where=where,
            hint="model.init=pretrained (benchmarks/variants_bench.py times LoftQ on random weights)",
        )
    checked.notes.extend(variant_notes(shapes, lora, kind))


def variant_notes(shapes: Any, lora: dict, kind: str) -> list[str]:
    """What a variant costs beyond plain LoRA (docs/memory.md, "LoRA variants")."""
    from fine_tune.adapters import changes_base
    from fine_tune.families.shapes import layer_kinds, lora_targets

    adapted = [
        dims
        for sparse, layers in layer_kinds(shapes)
        for dims in lora_targets(shapes, lora, sparse).values()
        for _ in range(layers)
    ]
    largest = max(adapted, key=lambda d: d[0] * d[1], default=(0, 0))
    each = f"each of the {len(adapted)} adapted weight matrices (largest {largest[1]}x{largest[0]})"
    init, notes = lora["init_lora_weights"], []
    if lora["use_dora"]:
        dequantized = " dequantized" if kind != "none" else ""
        notes.append(
            f"DoRA: every step recomputes the norm of {each},{dequantized} in fp32: slower steps, more memory"
            + (
                "; with lora_dropout > 0 also kept for the backward"
                if lora["lora_dropout"] and dequantized
                else ""
            )
        )
    if changes_base(init):
        how = (
            "a QR decomposition" if init == "olora" else "a randomized SVD" if "_niter_" in init else "an SVD"
        )
        notes.append(f"{init} init: {how} of {each} before the first step")
    if init == "loftq":
        notes.append(
            f"LoftQ init: reads {each} in full precision from the checkpoint and takes an SVD of "
            "its quantization error"
        )
    return notes


def _check_strategy(data: dict, shapes: Any, checked: Checked, cuda: Any, optimizer: str) -> None:
    """What FSDP cannot shard or run with; each refusal names the way that works (docs/scaling.md).
    In `validate=true` the checks of how the job was launched are notes: a laptop may validate a
    config meant for torchrun on GPUs."""
    from fine_tune.families.shapes import FOUR_BIT, experts_in_4bit
    from fine_tune.hardware import launched

    trainer, quant = data["trainer"], data["quant"]
    accelerate_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if trainer["strategy"] != "fsdp":
        if accelerate_fsdp:
            raise UserError(
                "accelerate's config turns FSDP on (ACCELERATE_USE_FSDP) but trainer.strategy is ddp",
                where="trainer.strategy",
                hint="use trainer=fsdp (fine_tune sets FSDP's options itself) and `accelerate launch "
                "--num_processes N` without an FSDP config",
            )
        return

    def refuse(why: str, where: str, hint: str) -> None:
        raise UserError(f"under trainer.strategy=fsdp, {why}", where=where, hint=hint)

    def refuse_here(why: str, hint: str) -> None:  # about this machine or launch, not the config
        if not data.get("validate"):
            raise UserError(why, where="trainer.strategy", hint=hint)
        checked.notes.append(f"trainer.strategy=fsdp: {why} ({hint})")

    kind = quant["kind"]
    if kind == "int8":
        refuse(
            "bitsandbytes' int8 weights cannot be sharded (their scales are kept outside the weight)",
            "quant.kind",
            "use quant=nf4 (4-bit weights, stored in bf16 for FSDP), or trainer=ddp",
        )
    if experts_in_4bit(shapes, quant):
        refuse(
            "fine_tune's 4-bit experts keep their packed weights in buffers, which FSDP does not shard "
            "(every GPU would hold all of them)",
            "quant.quant_experts",
            "set quant.quant_experts=false (bf16 experts, sharded over the GPUs), or use trainer=ddp "
            "with 4-bit experts (a whole 4-bit model per GPU)",
        )
    stored, need = quant["storage_dtype"], kind in FOUR_BIT and fsdp_storage_dtype(trainer, quant)
    if need and stored != need:
        refuse(
            f"4-bit weights stored as {stored} "
            + (
                "are left out of the sharding (every GPU would hold all of them)"
                if stored == "uint8"
                else f"would be cast to {need} by FSDP's mixed precision, which corrupts the packed values"
            ),
            "quant.storage_dtype",
            f"quant.storage_dtype={need} (trainer=fsdp sets bfloat16)",
        )
    if "bitsandbytes" in optimizer:
        refuse(
            "bitsandbytes optimizers (paged or 8-bit) do not take FSDP's sharded parameters",
            "optim.optimizer._target_",
            "use optim=adamw_torch (FSDP already splits the optimizer state over the GPUs)",
        )
    if trainer["fused_lora"] is True:
        hint = "use trainer.fused_lora=auto (off under fsdp) or false"
        refuse("fused LoRA layers were never run on sharded parameters", "trainer.fused_lora", hint)
    if not cuda:  # last: what the config says comes first
        refuse_here(
            "FSDP runs on GPUs only; on CPU processes accelerate 1.15 would quietly train with DDP",
            "use trainer.strategy=ddp on CPUs",
        )
    elif not launched():
        refuse_here(
            "FSDP shards over processes that a launcher started",
            "torchrun --nproc_per_node N -m fine_tune ..., or accelerate launch --num_processes N -m ...",
        )


def fsdp_storage_dtype(trainer: dict, quant: dict) -> str:
    """The dtype 4-bit weights must be stored in under FSDP: mixed precision casts every floating
    shard to the training precision's dtype before gathering it, so the packed bytes survive only
    if they are stored in that dtype already; in fp32 training, the compute dtype. `auto` resolves
    as on this machine's GPU, or as on a bf16 GPU where there is none (FSDP runs on GPUs only)."""
    from fine_tune.hardware import has_cuda, resolve_dtype, resolve_precision

    gpu = has_cuda()
    precision = resolve_precision(trainer["precision"]) if gpu or trainer["precision"] != "auto" else "bf16"
    if precision in ("bf16", "fp16"):
        return {"bf16": "bfloat16", "fp16": "float16"}[precision]
    compute = quant["compute_dtype"]
    return str(resolve_dtype(compute)).removeprefix("torch.") if gpu or compute != "auto" else "bfloat16"


class _LazyCuda:
    """Truthy when a GPU is there; asks torch (seconds to import) only when first evaluated."""

    @functools.cached_property
    def present(self) -> bool:
        from fine_tune.hardware import has_cuda

        return importlib.util.find_spec("torch") is not None and has_cuda()

    def __bool__(self) -> bool:
        return self.present


def check_config(cfg: DictConfig) -> Checked:
    """Types (completing the config with the schema's defaults), cross-checks and targets of the
    composed config; raises UserError on the first problem."""
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
# The plan of the run: parameter counts from the architecture, data, steps, memory.


def planned_steps(trainer: dict, train_rows: int) -> tuple[int, float]:
    """(optimizer steps, epochs they cover) as the Trainer will compute them, over every process."""
    per_step = effective_batch(trainer)[0]
    steps_per_epoch = max(math.ceil(train_rows / per_step), 1) if train_rows else 1
    if trainer["max_steps"] > 0:
        steps = int(trainer["max_steps"])
    else:
        steps = math.ceil(float(trainer["num_train_epochs"]) * steps_per_epoch)
    return steps, steps / steps_per_epoch


def longest_prompt(bundle: Any) -> int:
    return max((len(p["prompt_ids"]) for p in bundle.prompts), default=0)


def check_prompts(bundle: Any, max_length: int) -> None:
    """Held-out prompts must leave room for an answer inside max_length (the model never saw more).
    `Recipe.data` checks it: validate=true and every run."""
    longest = longest_prompt(bundle)
    if longest >= max_length:
        raise UserError(
            f"the longest prompt has {longest} tokens, not less than max_length {max_length}",
            where="dataset.max_length",
            hint="raise dataset.max_length, or shorten the prompts",
        )


def print_validation(cfg: DictConfig) -> None:
    """Validate everything that can be checked without weights, then print the plan of the run."""
    from rich.console import Console
    from rich.tree import Tree

    from fine_tune.adapters import variant_name

    checked = check_config(cfg)
    data = _plain(cfg)
    model, lora, trainer, quant, optim, dataset = (
        data[k] for k in ("model", "lora", "trainer", "quant", "optim", "dataset")
    )
    tree = Tree("[bold]fine_tune run plan[/bold] (validate=true: nothing was trained, no weights loaded)")

    built = instantiate_light(cfg)  # builds no data and no weights
    node = tree.add(
        f"[bold]checks[/bold]: {len(checked.targets)} targets import and accept their keys; "
        f"built without weights: {', '.join(built)}"
    )
    for path, target in checked.targets:
        node.add(f"{path}: {target}")

    try:  # the plan counts the parameters too: the same count as plan=true
        from fine_tune.plan import plan_memory

        plan = plan_memory(cfg)
    except Exception as error:  # noqa: BLE001 - advisory: a hub lookup without network, say
        plan = None
        checked.notes.append(f"no plan of this model ({str(error).splitlines()[0][:120]}): counts skipped")
    node = tree.add(
        f"[bold]model[/bold]: {model.get('name_or_path') or model['family']} "
        f"(init {model['init']}, dtype {model['dtype']}, attention {model['attn_implementation']})"
    )
    if plan is not None:
        total = plan.params_4bit + plan.params_other
        node.add(f"parameters: {total:,}")
    node.add(f"quantization: {quant['kind']}")
    node = tree.add(
        f"[bold]adapter[/bold]: LoRA r={lora['r']} alpha={lora['lora_alpha']} "
        f"on {lora['target_modules']}"
        + (" + experts" if lora["experts"] else "")
        + (f" ({variant_name(lora)})" if variant_name(lora) else "")
    )
    if plan is not None:
        node.add(
            f"trainable parameters: {plan.trainable_params:,} ({100 * plan.trainable_params / total:.3f}%)"
        )

    from fine_tune.quiet import quiet_libraries
    from fine_tune.recipe import Recipe

    quiet_libraries()
    recipe = Recipe(cfg)
    method = recipe.method
    node = tree.add(f"[bold]method[/bold]: {method.describe()}")
    if method.reference:
        node.add("reference: the base model with the adapter off, one forward per step without gradients")
    if data.get("init_adapter"):
        node.add(f"starting from the adapter in {data['init_adapter']}")

    bundle = recipe.data  # checked: prompts fit max_length (check_prompts)
    node = tree.add("[bold]data[/bold]")
    for line in bundle.report.format().splitlines():
        node.add(line.strip())
    node.add(f"{len(bundle.prompts)} held-out prompts for samples; longest {longest_prompt(bundle)} tokens")

    steps, epochs = planned_steps(trainer, len(bundle.train))
    effective, how = effective_batch(trainer)
    node = tree.add(
        f"[bold]training[/bold]: {steps} steps ({epochs:.2f} epochs), effective batch {effective}"
        + (" pairs (chosen + rejected: twice the sequences)" if method.pairs else "")
        + f" ({how}, {trainer['strategy']}), "
        f"max_length {dataset['max_length']}, precision {trainer['precision']}"
    )
    node.add(f"optimizer {optim['optimizer']['_target_']}, lr {optim['lr']}, scheduler {optim['scheduler']}")
    if optim["loraplus_lr_ratio"]:
        node.add(f"LoRA+: B matrices at lr x {optim['loraplus_lr_ratio']} (their own parameter group)")
    node.add(
        f"eval every {trainer['eval_steps']} steps, checkpoint every {trainer['save_steps']} "
        f"(keep {trainer['save_total_limit']}), resume={data.get('resume')}"
    )

    if plan is not None:
        tree.add(f"[bold]memory[/bold]: {plan.device_bytes() / 2**30:.2f} GiB expected ({plan.description})")
    if checked.notes:
        node = tree.add("[bold yellow]notes[/bold yellow]")
        for note in checked.notes:
            node.add(note)
    Console().print(tree)
    print("validation passed")


def instantiate_light(cfg: DictConfig) -> list[str]:
    """Build every object that holds no weights, so their own validation runs too (PEFT's LoraConfig,
    BitsAndBytesConfig, the method's TRL config, the optimizer factory, the tracker; nothing is started)."""
    import tempfile

    from fine_tune.recipe import Recipe
    from fine_tune.training.optim import build_optimizer_factory
    from fine_tune.utils.build import build

    build(cfg.lora)
    build(cfg.quant)
    with tempfile.TemporaryDirectory() as tmp:
        Recipe(cfg).arguments(tmp, has_eval=True)
    build_optimizer_factory(cfg.optim.optimizer, cfg.optim.loraplus_lr_ratio)
    build(cfg.logger)
    return ["lora", "quant", "method + trainer", "optim.optimizer", "logger"]
