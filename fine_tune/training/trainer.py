"""The Trainer: transformers' loop with our optimizer factory. We feed it already tokenized,
already masked data, so no TRL option renames can change what is trained."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import Trainer

from fine_tune.training.checkpoints import STAGING, publish, rotate
from fine_tune.training.exact_resume import ExactResume


def save_expert_adapters_if_any(model: Any, directory: Path) -> None:
    """The 4-bit expert adapters live outside PEFT: write them beside PEFT's files."""
    from fine_tune.models.moe import expert_lora_state_dict, save_expert_adapter

    if expert_lora_state_dict(model):
        save_expert_adapter(model, directory)


def restore_expert_adapters(model: Any, checkpoint: str | Path) -> None:
    """Resume: HF restores PEFT's weights; the expert adapters come from the file beside them."""
    from fine_tune.models.moe import EXPERT_ADAPTER_FILE, load_expert_adapter

    if (Path(checkpoint) / EXPERT_ADAPTER_FILE).exists():
        load_expert_adapter(model, checkpoint, trainable=True)


class FineTuneTrainer(ExactResume, Trainer):
    def __init__(self, *args: Any, optimizer_factory: Callable[[list], Any], **kwargs: Any) -> None:
        self.optimizer_factory = optimizer_factory
        self._staging = False
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        """The configured optimizer over the trainable (adapter) parameters, nothing else."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            params = [p for p in opt_model.parameters() if p.requires_grad]
            self.optimizer = self.optimizer_factory(params)
        return self.optimizer

    def _get_output_dir(self, trial: Any) -> str:
        root = super()._get_output_dir(trial)
        return os.path.join(root, STAGING) if self._staging else root

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """HF's checkpoint, written under checkpoints/.staging and renamed into place when whole.

        A kill during the save then leaves only the staging dir (cleaned on the next save or resume),
        never a `checkpoint-<step>` that resume would trust. Rotation is ours, by step number.
        """
        root = Path(super()._get_output_dir(trial))
        folder = f"checkpoint-{self.state.global_step}"
        staging = root / STAGING
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:  # PEFT's files hold no expert adapters: put ours beside them
                save_expert_adapters_if_any(self.model, staging / folder)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank's shards are written before the rename
        if self.args.should_save:
            publish(staging / folder, root / folder)
            shutil.rmtree(staging, ignore_errors=True)
            rotate(root, self.args.save_total_limit)
