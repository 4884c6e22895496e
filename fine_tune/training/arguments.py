"""`trainer` + `optim` nodes -> the TRL config of the run's method (`SFTConfig`, `DPOConfig`,
`ORPOConfig`: each a `transformers.TrainingArguments`).

We keep our own option names (stable across transformers/TRL renames) and translate them here. The
data reaches TRL tokenized, masked, packed and collated by `fine_tune.data`, so every data option of
TRL is set to "leave it alone" (the method says which: `Method.trl_arguments`), and every TRL
default that differs from TrainingArguments (checkpointing and bf16 on, its own learning rate) is
set from our config instead (docs/speed.md)."""

from __future__ import annotations

import importlib.util
from typing import Any

from fine_tune.errors import UserError


def _default(name: str) -> Any:
    from fine_tune.schema import TrainerSchema, default

    return default(TrainerSchema, name)


def _options(schema: type, node: Any) -> dict[str, Any]:
    """A nested trainer node (the schema's dataclass default, or a dict from the config) over the
    schema's defaults, as a plain dict; its values were checked by the schema."""
    given = vars(node) if isinstance(node, schema) else node
    return {**vars(schema()), **dict(given or {})}


DEFAULT_CHECKPOINTING = _default("checkpointing")
DEFAULT_GENERATION = _default("generation")
DEFAULT_FSDP = _default("fsdp")


def build_training_arguments(
    output_dir: str,
    seed: int,
    optim: dict,
    has_eval: bool = True,
    method: dict[str, Any] | None = None,
    max_steps: int = _default("max_steps"),
    num_train_epochs: float = _default("num_train_epochs"),
    per_device_train_batch_size: int = _default("per_device_train_batch_size"),
    per_device_eval_batch_size: int = _default("per_device_eval_batch_size"),
    gradient_accumulation_steps: int = _default("gradient_accumulation_steps"),
    gradient_checkpointing: bool = _default("gradient_checkpointing"),
    checkpointing: Any = DEFAULT_CHECKPOINTING,
    precision: str = _default("precision"),
    use_liger_kernel: bool | str = _default("use_liger_kernel"),
    fused_lora: bool | str = _default("fused_lora"),
    logging_steps: int = _default("logging_steps"),
    eval_steps: int = _default("eval_steps"),
    save_steps: int = _default("save_steps"),
    save_total_limit: int | None = _default("save_total_limit"),
    dataloader_num_workers: int = _default("dataloader_num_workers"),
    torch_compile: bool = _default("torch_compile"),
    strategy: str = _default("strategy"),
    fsdp: Any = DEFAULT_FSDP,
    decoder_layer: str | None = None,  # the model family's, passed by the run: what FSDP shards by
    generation: Any = DEFAULT_GENERATION,  # read by the samples callback; the node passes through whole
) -> Any:
    """Values come checked by `fine_tune.schema.TrainerSchema` / `OptimSchema` (ranges, allowed values);
    here they are only translated. `method` is `Method.trl_arguments(...)` of the run's method: the
    TRL config class and its keys (default: SFT's)."""
    from hydra.utils import get_class

    from fine_tune.hardware import has_cuda, resolve_precision
    from fine_tune.training.methods import sft

    method = dict(method or sft().trl_arguments(max_length=0))
    config_class = get_class(method.pop("config_class"))

    precision = resolve_precision(precision)
    if precision in ("bf16", "fp16") and not has_cuda():
        precision = "fp32"  # mixed precision on CPU is slower and not exact; the log says which was used
    checkpoint_kwargs = checkpointing_kwargs(checkpointing)  # checked even while checkpointing is off
    args = config_class(
        output_dir=output_dir,
        seed=seed,
        data_seed=seed,
        max_steps=max_steps,
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=per_device_eval_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        # Our optimizer factory builds the optimizer; these feed the scheduler and clipping.
        learning_rate=float(optim["lr"]),
        weight_decay=float(optim["weight_decay"]),
        lr_scheduler_type=optim["scheduler"],
        warmup_steps=float(optim["warmup_ratio"]),
        max_grad_norm=float(optim["max_grad_norm"]),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        dataloader_num_workers=dataloader_num_workers,
        torch_compile=torch_compile,
        activation_checkpointing=bool(gradient_checkpointing),
        activation_checkpointing_kwargs=checkpoint_kwargs if gradient_checkpointing else None,
        use_liger_kernel=resolve_liger(use_liger_kernel),
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to="none",  # our own trackers log; HF's WandbCallback would open a second run
        disable_tqdm=True,
        use_cpu=not has_cuda(),
        **parallel_kwargs(strategy, fsdp, decoder_layer),
        **method,
    )
    # ours, read by EngineMixin
    args.fused_lora = resolve_fused_lora(fused_lora, strategy)
    args.offload_checkpoints = bool(gradient_checkpointing) and offloads(checkpointing)
    return args


def parallel_kwargs(strategy: str, fsdp: Any, decoder_layer: str | None) -> dict[str, Any]:
    """`trainer.strategy` and `trainer.fsdp` -> the Trainer's DDP or FSDP arguments (docs/scaling.md).

    DDP: every parameter an adapter has is used in every step (no search for unused ones), and no
    buffers are broadcast before each forward: ours never change during training, and the 4-bit
    experts keep their packed weights in buffers (~23 GiB for Mixtral-8x7B, sent every step).

    FSDP2 (transformers' default version): one shard group per decoder layer (`decoder_layer`, named
    by the model's family), whole-model state dicts (adapters are small; training/sharded.py gathers
    only the trainable part). Checkpointing stays the Trainer's (non-reentrant, as on one GPU), at
    the cost of a second all-gather of each layer in the backward: FSDP's own wraps every layer in
    a `_checkpoint_wrapped_module`, and PEFT 0.21.2 then finds no adapter in the gathered state
    dict (it strips only FSDP1's module prefix), so every saved adapter would be empty.
    """
    if strategy != "fsdp":
        return {"ddp_find_unused_parameters": False, "ddp_broadcast_buffers": False}
    from fine_tune.schema import FsdpSchema

    options = _options(FsdpSchema, fsdp)
    config = {
        "version": 2,
        "reshard_after_forward": options["reshard_after_forward"],
        "cpu_offload": options["cpu_offload"],
        "activation_checkpointing": False,
        "state_dict_type": "FULL_STATE_DICT",
    }
    if decoder_layer:
        config["transformer_layer_cls_to_wrap"] = [decoder_layer]
    return {"fsdp": True, "fsdp_config": config}


def resolve_liger(value: bool | str) -> bool:
    """`auto`: Liger's Triton kernels where they run (a CUDA GPU with liger-kernel installed), else off."""
    from fine_tune.hardware import has_cuda

    installed = importlib.util.find_spec("liger_kernel") is not None
    if value == "auto":
        return installed and has_cuda()
    if value is False or value == "false":
        return False
    if not has_cuda():
        raise UserError(
            "Liger kernels are Triton GPU kernels and this machine has no CUDA GPU",
            where="trainer.use_liger_kernel",
            hint="use trainer.use_liger_kernel=auto (on with a GPU, off on CPU) or false",
        )
    if not installed:
        raise UserError(
            "trainer.use_liger_kernel=true needs the liger-kernel package",
            where="trainer.use_liger_kernel",
            hint="pip install 'fine_tune[gpu]', or trainer.use_liger_kernel=auto",
        )
    return True


def resolve_fused_lora(value: bool | str, strategy: str) -> bool:
    """`auto`: on with a CUDA GPU, where it was measured (docs/speed.md); off on CPU, where it computes
    the same numbers (tests) but was not timed, and under FSDP, whose sharded parameters it was
    never run with (`true` there: refused by validate's FSDP checks)."""
    from fine_tune.hardware import has_cuda

    return has_cuda() and strategy != "fsdp" if value == "auto" else value is True


def offloads(checkpointing: Any) -> bool:
    """`trainer.checkpointing.offload` where there is something to offload: on CPU the saved inputs
    already live in host memory. Done by fine_tune.training.offload, not by transformers' `offload`
    (whose copies wait in line with the compute)."""
    from fine_tune.hardware import has_cuda
    from fine_tune.schema import CheckpointingSchema

    return bool(_options(CheckpointingSchema, checkpointing)["offload"]) and has_cuda()


def checkpointing_kwargs(checkpointing: Any) -> dict[str, Any]:
    """`trainer.checkpointing` -> transformers' `activation_checkpointing_kwargs`.

    Always non-reentrant (the only kind that works with packed rows' keyword inputs and with
    selective checkpointing). `every_n_layers` is transformers' own key; `selective` is TRL's, turned
    into a selective-checkpointing policy by `FineTuneTrainer`; `offload` is ours (`offloads`).
    """
    from fine_tune.plan import every_n_layers
    from fine_tune.schema import CheckpointingSchema

    options = _options(CheckpointingSchema, checkpointing)
    kwargs: dict[str, Any] = {"use_reentrant": False}
    every_n = every_n_layers(options["every_n_layers"])
    if every_n > 1:
        kwargs["every_n_layers"] = every_n
    if options["mode"] == "selective":
        kwargs["selective"] = True
    return kwargs
