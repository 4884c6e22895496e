"""The Trainer: transformers' loop with our optimizer factory. We feed it already tokenized,
already masked data, so no TRL option renames can change what is trained."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import Trainer


class FineTuneTrainer(Trainer):
    def __init__(self, *args: Any, optimizer_factory: Callable[[list], Any], **kwargs: Any) -> None:
        self.optimizer_factory = optimizer_factory
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        """The configured optimizer over the trainable (adapter) parameters, nothing else."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            params = [p for p in opt_model.parameters() if p.requires_grad]
            self.optimizer = self.optimizer_factory(params)
        return self.optimizer
