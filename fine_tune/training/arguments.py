"""`trainer` + `optim` nodes -> `transformers.TrainingArguments`.

We keep our own option names (stable across transformers/TRL renames) and translate them here."""

from __future__ import annotations

from typing import Any

from fine_tune.errors import UserError


def build_training_arguments(
    output_dir: str,
    seed: int = 42,
    max_steps: int = -1,
    num_train_epochs: float = 1,
    per_device_train_batch_size: int = 8,
    per_device_eval_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool = False,
    precision: str = "auto",
    logging_steps: int = 10,
    eval_steps: int = 100,
    save_steps: int = 100,
    save_total_limit: int | None = 2,
    dataloader_num_workers: int = 0,
    torch_compile: bool = False,
    has_eval: bool = True,
    optim: Any = None,
    # Consumed elsewhere (data, generation); accepted so the whole node can be passed through.
    max_length: int | None = None,
    packing: bool = False,
    generation: Any = None,
) -> Any:
    from transformers import TrainingArguments

    from fine_tune.hardware import has_cuda, resolve_precision

    for key, value in (
        ("per_device_train_batch_size", per_device_train_batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("logging_steps", logging_steps),
        ("eval_steps", eval_steps),
        ("save_steps", save_steps),
    ):
        if value <= 0:
            raise UserError(f"must be positive, got {value}", where=f"trainer.{key}")
    if max_steps <= 0 and num_train_epochs <= 0:
        raise UserError(
            "nothing to train",
            where="trainer.max_steps",
            hint="set trainer.max_steps > 0 or trainer.num_train_epochs > 0",
        )
    precision = resolve_precision(precision)
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(
            f"unknown precision '{precision}'", where="trainer.precision", hint="use auto, bf16, fp16 or fp32"
        )
    if precision in ("bf16", "fp16") and not has_cuda():
        precision = "fp32"  # mixed precision on CPU is slower and not exact; the log says which was used
    optim = optim or {}
    return TrainingArguments(
        output_dir=output_dir,
        seed=seed,
        data_seed=seed,
        max_steps=max_steps,
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=per_device_eval_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        # Our optimizer factory builds the optimizer; these feed the scheduler and clipping.
        learning_rate=float(optim.get("lr", 2e-4)),
        weight_decay=float(optim.get("weight_decay", 0.0)),
        lr_scheduler_type=optim.get("scheduler", "cosine"),
        warmup_steps=float(optim.get("warmup_ratio", 0.0)),
        max_grad_norm=float(optim.get("max_grad_norm", 1.0)),
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
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to="none",  # our own trackers log; HF's WandbCallback would open a second run
        disable_tqdm=True,
        use_cpu=not has_cuda(),
        ddp_find_unused_parameters=False,
    )
