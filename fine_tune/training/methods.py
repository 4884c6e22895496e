"""The training method (`method` group): which TRL trainer trains the run, on which kind of data.

This is the one seam between a run and its trainer. Every method gets the same tokenizer, data
pipeline, model, quantization and adapter from `fine_tune.recipe.Recipe`; a method says which
TRL config and trainer class take them over, what the TRL config must hold on top of the common
arguments (`fine_tune/training/arguments.py`), and what the data and the memory planner must know
(the kind of data it trains on; whether a step also runs a reference forward).

    sft   TRL's SFTTrainer on instruction/chat/text examples (fine_tune/training/trainer.py)
    dpo   TRL's DPOTrainer on preference pairs (fine_tune/training/preference.py)
    orpo  TRL 1.16's experimental ORPOTrainer on preference pairs (the same module)

Adding a method is a builder here, its schema in `fine_tune/schema.py` and a `conf/method/` YAML.
Nothing heavy is imported at module level: the planner and `validate=true` read these specs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fine_tune.schema import DPOMethodSchema, ORPOMethodSchema, default

SFT_DATA, PREFERENCE_DATA = "sft", "preference"  # `DataBundle.kind` of what a method trains on


@dataclass(frozen=True)
class Method:
    """A built `method` node: what a run needs to know to train with it."""

    name: str
    data_kind: str  # the DataBundle.kind it trains on
    config_class: str  # the TRL config class (import path)
    trainer_class: str  # our subclass of the TRL trainer (import path)
    reference: bool = False  # a reference forward (no gradients) per step, unless precomputed
    pairs: bool = False  # chosen and rejected go through one forward: twice the rows of a batch
    options: dict[str, Any] = field(default_factory=dict)  # keys of the TRL config

    def trl_arguments(self, max_length: int, starts_from_adapter: bool = False) -> dict[str, Any]:
        """What the TRL config of this method holds besides the arguments every method shares."""
        options = dict(self.options)
        if "loss_type" in options:
            options["loss_type"] = [options["loss_type"]]  # TRL takes a list (weighted sums of losses)
        if self.name == "dpo" and starts_from_adapter and not options["precompute_ref_log_probs"]:
            # The reference of DPO is the model it starts from. From a fresh adapter that is the base
            # with the adapter off, at any step; from an SFT run's adapter (init_adapter) it is that
            # adapter as loaded, which training then changes: its log-probabilities are taken once,
            # before the first step, rather than keeping a frozen copy of the adapter.
            options["precompute_ref_log_probs"] = True
        if self.name == "orpo":
            options["max_length"] = max_length  # ORPO reads it (and warns without it); our pairs fit
        return {"config_class": self.config_class, **options, **_DATA_OFF[self.name]}

    def describe(self) -> str:
        """One line for validate=true and the log."""
        shown = ", ".join(f"{k} {v}" for k, v in self.options.items() if k != "disable_dropout")
        return f"{self.name}" + (f" ({shown})" if shown else "")


# Our data pipeline tokenized, masked, truncated (dataset.truncation) and packed the examples, and
# our collators (TRL's own for pairs) batch them: TRL prepares nothing, truncates nothing, packs nothing.
_DATA_OFF: dict[str, dict[str, Any]] = {
    "sft": {
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "max_length": None,
        "packing": False,
        "padding_free": False,
        "pad_to_multiple_of": None,
    },
    # DPO's collator would cut sequences to max_length (ours already fit) and pad to a multiple of 8
    "dpo": {"max_length": None, "padding_free": False, "pad_to_multiple_of": None},
    "orpo": {},
}


def sft() -> Method:
    """Supervised fine-tuning: the loss of the trained tokens of each example."""
    return Method(
        name="sft",
        data_kind=SFT_DATA,
        config_class="trl.SFTConfig",
        trainer_class="fine_tune.training.trainer.FineTuneTrainer",
    )


def dpo(
    beta: float = default(DPOMethodSchema, "beta"),
    loss_type: str = default(DPOMethodSchema, "loss_type"),
    label_smoothing: float = default(DPOMethodSchema, "label_smoothing"),
    precompute_ref_log_probs: bool = default(DPOMethodSchema, "precompute_ref_log_probs"),
    disable_dropout: bool = default(DPOMethodSchema, "disable_dropout"),
) -> Method:
    """Direct Preference Optimization against a reference: the base model with the adapter off
    (values checked by `schema.DPOMethodSchema`; what each key trades is in conf/method/dpo.yaml)."""
    return Method(
        name="dpo",
        data_kind=PREFERENCE_DATA,
        config_class="trl.DPOConfig",
        trainer_class="fine_tune.training.preference.FineTuneDPOTrainer",
        reference=not precompute_ref_log_probs,
        pairs=True,
        options={
            "beta": float(beta),
            "loss_type": loss_type,
            "label_smoothing": float(label_smoothing),
            "precompute_ref_log_probs": bool(precompute_ref_log_probs),
            "disable_dropout": bool(disable_dropout),
        },
    )


def orpo(
    beta: float = default(ORPOMethodSchema, "beta"),
    disable_dropout: bool = default(ORPOMethodSchema, "disable_dropout"),
) -> Method:
    """Odds Ratio Preference Optimization: the chosen answers' NLL plus beta x an odds-ratio term;
    no reference model."""
    return Method(
        name="orpo",
        data_kind=PREFERENCE_DATA,
        config_class="trl.experimental.orpo.ORPOConfig",
        trainer_class="fine_tune.training.preference.FineTuneORPOTrainer",
        pairs=True,
        options={"beta": float(beta), "disable_dropout": bool(disable_dropout)},
    )


def method_of(node: Mapping[str, Any] | None) -> Method:
    """The `method` node (plain or DictConfig, completed by the schema) built; none: SFT (runs
    written before the method group existed)."""
    if not node:
        return sft()
    from fine_tune.utils.build import build

    return build(dict(node))
