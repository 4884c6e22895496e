"""One fine-tuning run, start to end, in the order a reader expects:

    validate -> tokenizer -> data -> model (+quant) -> adapter -> trainer -> train/eval -> save -> metric

`fine_tune.recipe.Recipe` builds each object from the composed config (the trainer is the one of
the run's method: SFT, DPO or ORPO); this module runs them and writes what the run directory
keeps. Heavy libraries are imported inside functions, never when the package is imported, so
`--help` and `--cfg job` stay instant. Nothing else imports this module but the entry point."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fine_tune.errors import Preempted
from fine_tune.residual_init import INITIAL
from fine_tune.utils.io import atomic_write_json, publish_dir, remove_partial_publishes

log = logging.getLogger("fine_tune")


# The directories of a run written with `publish_dir` (the checkpoints have their own scheme).
SAVED_DIRS = ("adapter", "tokenizer", INITIAL)


def remove_partial_saves(run_dir: Path) -> None:
    """What a kill during the adapter/tokenizer save leaves behind (hidden, never complete)."""
    for name in SAVED_DIRS:
        remove_partial_publishes(run_dir / name)


def save_adapter(model: Any, directory: Path, run_dir: Path, state_dict: dict | None = None) -> None:
    """PEFT's files, plus the 4-bit expert adapters PEFT cannot hold (generate/export load both); a
    PiSSA/OLoRA adapter as plain LoRA on the original base (fine_tune/residual_init.py);
    `state_dict`: the adapter gathered from FSDP's shards (`distributed.sharded_trainable_state`)."""
    from fine_tune.residual_init import convert_saved_adapter
    from fine_tune.training.trainer import save_expert_adapters_if_any

    model.save_pretrained(directory, state_dict=state_dict)
    save_expert_adapters_if_any(model, directory)
    convert_saved_adapter(directory, run_dir / INITIAL)


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """`save_pretrained` plus the SentencePiece model it drops: the data pipeline encodes the Mistral
    format with SentencePiece, so a reloaded run must find the same model file."""
    tokenizer.save_pretrained(directory)
    source = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
    if source and Path(source).is_file() and not (Path(directory) / "tokenizer.model").exists():
        shutil.copy(source, Path(directory) / "tokenizer.model")


def train(cfg: DictConfig, run_dir: Path, tracker: Any, job: dict) -> tuple[dict, Any]:
    """Build everything, train, evaluate, save; return the final metrics (also in metrics.json) and
    the trainer, whose model tests compare with the saved adapter."""
    from fine_tune.schema import check_types
    from fine_tune.training.preemption import PreemptionHandler

    check_types(cfg)  # the schema's defaults complete the config every builder below reads

    with PreemptionHandler() as preemption:  # a SIGTERM from here on stops cleanly, with a checkpoint
        return _train(cfg, run_dir, tracker, job, preemption)


def _train(cfg: DictConfig, run_dir: Path, tracker: Any, job: dict, preemption: Any) -> tuple[dict, Any]:
    from transformers import set_seed

    from fine_tune.adapters import count_parameters
    from fine_tune.distributed import effective_batch, sharded_trainable_state
    from fine_tune.hardware import is_main_process, world_size
    from fine_tune.recipe import Recipe
    from fine_tune.residual_init import save_initial_adapter
    from fine_tune.training.checkpoints import prepare_resume
    from fine_tune.training.progress import ProgressBar
    from fine_tune.training.trainer import restore_expert_adapters

    started = time.perf_counter()
    checkpoint, logged = prepare_resume(cfg.resume, run_dir, cfg.lora, cfg.trainer)
    if is_main_process():
        remove_partial_saves(run_dir)
    set_seed(cfg.seed)
    recipe = Recipe(cfg)
    data = recipe.data  # bad data fails here, before any weights load
    log.info("method: %s\ndata report\n%s", recipe.method.describe(), data.report.format())
    if is_main_process():  # generate/export read the template the run trained with
        atomic_write_json(run_dir / "data_report.json", data.report.to_dict())
    model = recipe.model
    if is_main_process():  # PiSSA/OLoRA: the adapter as initialised, which the saved adapter subtracts
        save_initial_adapter(model, run_dir)
    if checkpoint is not None:
        restore_expert_adapters(model, checkpoint)  # HF's resume restores PEFT's weights only
    trainable, total = count_parameters(model)
    log.info(
        "trainable parameters: %s of %s (%.3f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    log.info("effective batch %d (%s, %s)", *effective_batch(cfg.trainer), cfg.trainer.strategy)
    trainer, metrics_cb = recipe.trainer(run_dir, tracker, preemption)
    trainer.add_callback(ProgressBar())  # shown only when stderr is a terminal
    metrics_cb.resume_from(logged)
    tracker.start(cfg, run_dir, job)
    if not preemption.requested:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if preemption.requested:
        from fine_tune.training.checkpoints import list_checkpoints

        saved = list_checkpoints(run_dir / "checkpoints")
        raise Preempted(preemption.signum, str(saved[-1]) if saved else None, preemption.previous_handler)
    eval_loss = final_eval_loss(trainer, metrics_cb, data)
    gathered = sharded_trainable_state(model)  # under FSDP every rank sends its shard of the adapter
    if is_main_process():
        publish_dir(run_dir / "adapter", lambda d: save_adapter(model, d, run_dir, gathered))
        publish_dir(run_dir / "tokenizer", lambda d: save_tokenizer(recipe.tokenizer, d))
    metrics = final_metrics(
        trainer.state, metrics_cb, eval_loss, trainable, total, time.perf_counter() - started
    )
    metrics.update(world_size=world_size(), effective_batch=effective_batch(cfg.trainer)[0])
    if is_main_process():
        atomic_write_json(run_dir / "metrics.json", metrics)
        tracker.summary(metrics)
    log.info(
        "final: train loss %.4f (first %.4f), eval loss %s, %d steps, %.0f tokens/s",
        metrics["train_loss"] or float("nan"),
        metrics["first_train_loss"] or float("nan"),
        f"{eval_loss:.4f}" if eval_loss is not None else "n/a",
        metrics["steps"],
        metrics["tokens_per_second"] or 0.0,
    )
    return metrics, trainer


def final_eval_loss(trainer: Any, metrics_cb: Any, data: Any) -> float | None:
    """The last step may just have been evaluated: reuse it rather than evaluate twice."""
    if data.eval is None:
        return None
    if metrics_cb.last_eval.get("step") == trainer.state.global_step:
        return metrics_cb.last_eval["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def final_metrics(
    state: Any, metrics_cb: Any, eval_loss: float | None, trainable: int, total: int, runtime: float
) -> dict:
    """metrics.json: what compare, sweeps and the model card read (keys in docs/contracts.md).

    Speed figures cover training time only (eval, samples and checkpoint saves are timed apart);
    `runtime_s` is the whole job, model loading included."""
    from fine_tune.hardware import peak_memory_gib

    return {
        "first_train_loss": metrics_cb.first_loss,
        "train_loss": metrics_cb.last_loss,
        "eval_loss": eval_loss,
        "eval_perplexity": (
            math.exp(min(eval_loss, 50.0)) if eval_loss is not None and metrics_cb.perplexity else None
        ),
        "steps": state.global_step,
        "tokens_seen": int(state.num_input_tokens_seen or 0),
        **metrics_cb.summary(),
        "peak_memory_gib": peak_memory_gib(),
        "trainable_params": trainable,
        "total_params": total,
        "runtime_s": runtime,
    }


def objective(metrics: dict) -> float | None:
    """The number a sweeper minimizes: eval loss, or the last train loss without an eval split."""
    value = metrics.get("eval_loss")
    return value if value is not None else metrics.get("train_loss")


def run(cfg: DictConfig, run_dir: Path, job: dict) -> float | None:
    """Train a config that passed `fine_tune.validate.check_config`; return the sweepers' metric."""
    from fine_tune.distributed import end_process_group, quiet_other_ranks
    from fine_tune.utils.build import build

    quiet_other_ranks()  # under torchrun: one progress log and one summary, from rank 0
    tracker = build(cfg.logger)
    status = "failed"
    try:
        metrics, _ = train(cfg, run_dir, tracker, job)
        status = "finished"
        return objective(metrics)
    except (KeyboardInterrupt, Preempted):
        status = "preempted"
        raise
    finally:
        tracker.finish(status)
        end_process_group(finished=status == "finished")


def job_info() -> tuple[Path, dict]:
    """The run directory and the job: its overrides, number and sweep dir (None in a single run)."""
    from hydra.core.hydra_config import HydraConfig

    from fine_tune.tracking.base import hydra_job_info

    info = hydra_job_info()
    job = {
        "overrides": info.get("overrides", []),
        "num": info.get("num", 0),
        "sweep_dir": info.get("sweep_dir"),
    }
    return Path(HydraConfig.get().runtime.output_dir), job
