"""Checkpoints of an FSDP run: the adapter gathered from its shards, nothing else.

transformers' `Trainer.save_model` under FSDP gathers the whole model's state dict onto rank 0 and
then keeps the adapter of it: the frozen base too, every checkpoint (about 4 GiB for a 4-bit
Mistral-7B, about 87 GiB for Mixtral-8x7B's bf16 experts). Here only the trainable weights are
gathered (`fine_tune.distributed.sharded_trainable_state`); the optimizer state and the resume
files are transformers' own (`save_fsdp_model(adapter_only=True)`, `save_fsdp_optimizer`).
"""

from __future__ import annotations

from typing import Any

from fine_tune.distributed import sharded_trainable_state


class ShardedSaves:
    """Mixin for transformers' Trainer (placed before it in the bases)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> Any:
        gathered = sharded_trainable_state(self.model) if self.is_fsdp_enabled else None
        if gathered is None:
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:  # every rank gathered; rank 0 writes
            self._save(output_dir or self.args.output_dir, state_dict=gathered)
        return None
