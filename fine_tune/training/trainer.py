"""The engine: TRL's trainers, fed with our token-exact, pre-tokenized, already-masked batches.

`EngineMixin` is what every run's trainer adds to its TRL trainer, whatever the method
(fine_tune/training/methods.py): our optimizer factory, checkpoints written whole or not at all
(with the 4-bit expert adapters PEFT cannot save), exact resume, timing of everything that is not
training. What it turns off, because it would change what a run trains or writes (docs/speed.md):
TRL's cast of QLoRA adapters to bf16, its MoE load-balancing loss switched on from the model
config, its model card in checkpoints/ and its telemetry ping. `FineTuneTrainer` is the SFT engine
(TRL's `SFTTrainer`: its fused LM head computes the loss from chunked log-probabilities of the
labelled positions, never a full logits tensor); the preference engines are in `preference.py`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trl import SFTTrainer

from fine_tune.training.checkpoints import STAGING, rotate
from fine_tune.training.exact_resume import ExactResume
from fine_tune.training.offload import OverlappedOffload, offload_checkpoints
from fine_tune.training.sharded import ShardedSaves
from fine_tune.training.throughput import PhaseTimer
from fine_tune.utils.io import replace_dir


def save_expert_adapters_if_any(model: Any, directory: Path) -> None:
    """The 4-bit expert adapters live outside PEFT: add them to PEFT's files, in PEFT's layout."""
    from fine_tune.models.moe import expert_lora_state_dict, save_expert_adapter

    if expert_lora_state_dict(model):
        save_expert_adapter(model, directory)


def restore_expert_adapters(model: Any, checkpoint: str | Path) -> None:
    """Resume: HF restores PEFT's weights (it skips the expert tensors); ours take those."""
    from fine_tune.models.moe import expert_lora_state_dict, load_expert_adapter

    if expert_lora_state_dict(model):
        load_expert_adapter(model, checkpoint, trainable=True)


def router_aux_loss_coef(config: Any) -> float | None:
    """The MoE load-balancing loss as the model config asks for it (`output_router_logits`).

    TRL would add it whenever the config names a coefficient (Mixtral's config.json says 0.02 with
    `output_router_logits: false`), so a Mixtral run would train another loss than the one its
    config describes. None for dense models, where TRL refuses any coefficient.
    """
    text = config.get_text_config()
    if not hasattr(text, "output_router_logits"):
        return None
    return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0) if text.output_router_logits else 0.0


def liger_kernel_config(config: Any) -> dict[str, bool]:
    """Liger's SwiGLU replaces the forward of `mlp.experts` on MoE models, which would bypass the
    4-bit experts and PEFT's expert adapters: MoE models get Liger's RMSNorm and RoPE only."""
    from fine_tune.families import is_moe

    return {"swiglu": False} if is_moe(config.get_text_config().to_dict()) else {}


@contextlib.contextmanager
def adapter_dtypes_kept(model: Any) -> Iterator[None]:
    """Undo TRL's cast of trainable weights to bf16 on quantized models: adapters stay in the dtype
    they were created in (fp32 under autocast, as before TRL), bit for bit."""
    saved = {param: param.data for param in model.parameters() if param.requires_grad}
    yield
    for param, data in saved.items():
        if param.data.dtype != data.dtype:
            param.data = data


def enable_selective_checkpointing(model: Any) -> None:
    """TRL's selective checkpointing (keep attention outputs, recompute the rest) wraps the method of
    the object it is given; transformers' Trainer reaches the inner model's method through PEFT, so
    the wrapper must sit on the inner model or it is silently skipped."""
    from trl.models import enable_selective_activation_checkpointing

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable_selective_activation_checkpointing(inner)


class EngineMixin(ExactResume, ShardedSaves):
    """Our behaviour on top of a TRL trainer; place it before the TRL class in the bases."""

    def __init__(
        self,
        model: Any,
        args: Any,
        *,
        optimizer_factory: Callable[[list], Any],
        timer: PhaseTimer | None = None,
        **kwargs: Any,
    ) -> None:
        self.optimizer_factory = optimizer_factory
        self.timer = timer or PhaseTimer()
        self.offload = OverlappedOffload() if getattr(args, "offload_checkpoints", False) else None
        self._staging = False
        self._fused: tuple[bool, list] | None = None  # (trainer.fused_lora, its forwards): fast_adapters
        args.router_aux_loss_coef = router_aux_loss_coef(model.config)
        if args.use_liger_kernel:
            liger = {**(args.liger_kernel_config or {}), **liger_kernel_config(model.config)}
            args.liger_kernel_config = liger
        if args.activation_checkpointing and (args.activation_checkpointing_kwargs or {}).get("selective"):
            enable_selective_checkpointing(model)
        with adapter_dtypes_kept(model), warnings.catch_warnings():
            # Liger through TRL is deprecated in favour of hub kernels, which we cannot download at run time.
            warnings.filterwarnings("ignore", message=".*use_liger_kernel.*", category=FutureWarning)
            super().__init__(model=model, args=args, **kwargs)

    def lora_inputs_uncast(self) -> contextlib.AbstractContextManager:
        """PEFT casts the input of every adapted nn.Linear to the adapter's dtype (fp32) before the
        adapter: an fp32 copy of each activation, which autocast casts back to bf16 for the matmul
        (bitsandbytes' layers already skip it under autocast). Under mixed precision a training or
        evaluation step goes without it: on an H100 bf16 LoRA trained 1.19x faster (docs/speed.md).
        Per step, not for good: samples generate outside autocast, where the cast is needed."""
        from peft.helpers import disable_input_dtype_casting

        return disable_input_dtype_casting(self.model, active=bool(self.args.bf16 or self.args.fp16))

    @contextlib.contextmanager
    def fast_adapters(self) -> Iterator[None]:
        """A training or evaluation step's LoRA layers: inputs uncast, computed fused where asked
        (`trainer.fused_lora`, fine_tune/training/fused_lora.py)."""
        from fine_tune.training.fused_lora import fused_forwards, swapped_forwards

        fused = getattr(self.args, "fused_lora", False)  # set by build_training_arguments
        if self._fused is None or self._fused[0] != fused:  # found on the first step: the model is final
            self._fused = fused, fused_forwards(self.model) if fused else []
        with self.lora_inputs_uncast(), swapped_forwards(self._fused[1]):
            yield

    def offloaded_checkpoints(self) -> contextlib.AbstractContextManager:
        """`trainer.checkpointing.offload`: the checkpointed layers (enabled by the Trainer when
        training starts) keep their inputs in host memory for this step (fine_tune.training.offload)."""
        if self.offload is None:
            return contextlib.nullcontext()
        offload_checkpoints(self.model, self.offload)
        return self.offload.step()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.fast_adapters(), self.offloaded_checkpoints():
            return super().training_step(*args, **kwargs)

    def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.fast_adapters():
            return super().prediction_step(*args, **kwargs)

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        """`trainer.torch_compile` compiles each decoder layer (accelerate's regional compilation), not
        the whole model: on an H100 whole-model compile trained at 0.91x, per layer at 1.00x (nf4) and
        1.03x (bf16) of eager, and each compile costs start-up time (docs/speed.md)."""
        args = super()._build_accelerator_args(**kwargs)
        if args.get("dynamo_plugin") is not None:
            args["dynamo_plugin"].use_regional_compilation = True
        return args

    def _send_telemetry(self) -> None:
        """TRL pings the Hugging Face hub when a trainer is built; a run talks to no server unasked."""

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL writes a README.md into checkpoints/ at every save; `fine_tune.export` writes the card."""

    def create_optimizer(self, model=None):
        """The configured optimizer over the trainable (adapter) parameters, nothing else; named, so
        that LoRA+ can tell the B matrices apart."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            params = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            self.optimizer = self.optimizer_factory(params)
        return self.optimizer

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Evaluation must not change the training that follows it: iterating a DataLoader draws its
        base seed from torch's global RNG, which would shift every later dropout mask, so the losses
        of a run would depend on `trainer.eval_steps`. The RNG is forked around it, as for samples."""
        import torch

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with self.timer.measure("eval"), torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        root = super()._get_output_dir(trial)
        return os.path.join(root, STAGING) if self._staging else root

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """HF's checkpoint, written under checkpoints/.staging and renamed into place when whole.

        A kill during the save then leaves only the staging dir (cleaned on the next save or resume),
        never a `checkpoint-<step>` that resume would trust. Rotation is ours, by step number.
        """
        with self.timer.measure("checkpoint"):
            root = Path(super()._get_output_dir(trial))
            folder = f"checkpoint-{self.state.global_step}"
            staging = root / STAGING
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()  # no rank writes its RNG state into a dir being removed
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)
                if self.args.should_save:  # PEFT's files hold no expert adapters: put ours beside them
                    save_expert_adapters_if_any(self.model, staging / folder)
            finally:
                self._staging = False
            self.accelerator.wait_for_everyone()  # every rank's shards are written before the rename
            if self.args.should_save:
                replace_dir(staging / folder, root / folder)
                shutil.rmtree(staging, ignore_errors=True)
                rotate(root, self.args.save_total_limit)


class FineTuneTrainer(EngineMixin, SFTTrainer):
    """Supervised fine-tuning: TRL's SFTTrainer on our tokenized, masked (and packed) examples."""
