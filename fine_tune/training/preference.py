"""The preference engines: TRL 1.16's `DPOTrainer` and experimental `ORPOTrainer`, fed with the
pairs `fine_tune.data.build_preference_data` tokenized (prompt_ids / chosen_ids / rejected_ids:
token-exact with the SFT rendering, only answer tokens counted; docs/contracts.md).

Both keep what every run's trainer keeps (`EngineMixin`: optimizer factory, whole-or-absent
checkpoints with the expert adapters, exact resume, preemption, our metrics and samples callbacks,
no telemetry, no model card). What differs from TRL, and why:

- DPO: TRL re-tokenizes text in `_prepare_dataset` (it would fail on our columns): our rows pass
  through as they are, and TRL's own collator batches them. The reference is the base model with
  every adapter off, PEFT's and our 4-bit expert adapters alike (`moe.lora.switch_with_peft`):
  TRL copies the adapter into a frozen "ref" adapter when it is given a PEFT model, which is
  dropped again here (it would not cover the expert adapters, would be saved with every
  checkpoint, and its creation freezes them). From `init_adapter` the reference is the loaded
  adapter, taken before the first step (`methods.Method.trl_arguments`).
- ORPO: `tokenize_row` returns our ids (`orpo_features`) instead of tokenizing text; the forward
  goes through TRL's fused LM head (log-probabilities of the answer tokens only, no full logits
  tensor), and the NLL term counts the chosen answers' tokens only, as every other loss of
  fine_tune does (TRL's `concatenated_forward` counts the prompt too, so its NLL is partly a
  language-modelling loss on prompts).
- Both get the pairs as in-memory datasets: TRL maps and caches over them, and those caches must
  not land in (or depend on) fine_tune's data cache.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from trl import DPOTrainer
from trl.experimental.orpo import ORPOTrainer

from fine_tune.data.preference import COLUMNS, orpo_features
from fine_tune.training.trainer import EngineMixin


def in_memory(dataset: Any) -> Any:
    """The same rows, held in memory (a dataset read from fine_tune's cache points into it)."""
    return None if dataset is None else dataset.map(keep_in_memory=True)


class PreferenceMixin(EngineMixin):
    """What the preference engines share; the TRL trainer comes after it in the bases."""

    def __init__(self, model: Any, args: Any, *, train_dataset: Any, eval_dataset: Any = None, **kwargs):
        super().__init__(
            model,
            args,
            train_dataset=in_memory(train_dataset),
            eval_dataset=in_memory(eval_dataset),
            **kwargs,
        )

    def train_metric_lists(self) -> MutableMapping[str, list[float]]:
        """The per-step values TRL averages into the next logged row (rewards, log-probs, ...)."""
        raise NotImplementedError

    def logging_window_state(self) -> dict[str, Any]:
        return {"metrics": {key: list(values) for key, values in self.train_metric_lists().items()}}

    def restore_logging_window_state(self, state: dict[str, Any]) -> None:
        lists = self.train_metric_lists()
        for key, values in (state.get("metrics") or {}).items():
            lists[key].extend(values)


class FineTuneDPOTrainer(PreferenceMixin, DPOTrainer):
    """DPO on our pairs; the reference is the base model with every adapter off (module docstring)."""

    def __init__(self, model: Any, args: Any, **kwargs: Any) -> None:
        trainable = {param: param.requires_grad for param in model.parameters()}
        super().__init__(model, args, **kwargs)
        if "ref" in getattr(model, "peft_config", {}):  # precomputed log-probs (if asked) are taken by now
            model.delete_adapter("ref")
        for param, wanted in trainable.items():  # PEFT's add_adapter froze everything not named lora_
            param.requires_grad_(wanted)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if set(COLUMNS) <= set(dataset.column_names):  # our pairs: tokenized, masked, fitted
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def train_metric_lists(self) -> MutableMapping[str, list[float]]:
        return self._metrics["train"]


class FineTuneORPOTrainer(PreferenceMixin, ORPOTrainer):
    """ORPO on our pairs: answer-only NLL, log-probabilities from TRL's fused LM head."""

    def __init__(self, model: Any, args: Any, **kwargs: Any) -> None:
        from trl.trainer.utils import add_fused_lm_head

        super().__init__(model, args, **kwargs)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        add_fused_lm_head(inner, outputs=("log_probs", "mean_logits"))

    # TRL maps this over the pairs; a plain function (not a bound method) keeps `datasets` from
    # pickling the whole trainer to fingerprint the map.
    tokenize_row = staticmethod(orpo_features)

    def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> tuple:
        """TRL's outputs (chosen and rejected mean log-probabilities, their logits for the metrics,
        the chosen NLL[, the MoE aux loss]), computed over the answer tokens only."""
        joined = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self.padding_value, device=self.accelerator.device
        )
        labels = joined["concatenated_labels"]  # -100 on prompts and padding
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        outputs = model(
            joined["concatenated_input_ids"],
            attention_mask=joined["concatenated_attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
            **extra,
        )
        answer = labels[:, 1:] != -100
        log_probs = outputs.log_probs  # per next-token position, 0 off the answers
        mean_log_probs = log_probs.sum(-1) / answer.sum(-1).clamp(min=1)
        n = batch["chosen_labels"].shape[0]
        nll = -log_probs[:n].sum() / answer[:n].sum().clamp(min=1)
        logits = outputs.mean_logits.detach()
        result = (
            mean_log_probs[:n],
            mean_log_probs[n:],
            logits[:n][answer[:n]],
            logits[n:][answer[n:]],
            nll,
        )
        return (*result, outputs.aux_loss) if self.aux_loss_enabled else result

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Tokens of the one forward over chosen and rejected rows (the batch has no `input_ids`)."""
        if self.args.include_num_input_tokens_seen == "no":
            return
        import torch

        tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
        tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    def train_metric_lists(self) -> MutableMapping[str, list[float]]:
        return self._stored_metrics["train"]
