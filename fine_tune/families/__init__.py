"""Model families: what fine_tune knows about an architecture, one module per family.

A family module here (mistral.py, mixtral.py, qwen2_moe.py) holds `FAMILY = Family(...)`: the
transformers config class, the shapes of its reference checkpoint (so `plan=true` and
`model.init=random` need no hub), how its checkpoints store experts, what PEFT does to its MoE
layers, and which measured planner coefficients apply. The modules are found by listing this
package, so adding a family is one file here plus `conf/model/<name>.yaml` (docs/contracts.md).
Shapes and parameter counts, shared by the planner and validation, are in `families.shapes`.

Only the standard library is imported: planning and validation must answer in a second.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from fine_tune.errors import UserError

# The two spellings transformers uses for the number of experts per MoE layer.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")


@dataclass(frozen=True)
class CheckpointExperts:
    """How a checkpoint stores experts one by one: `<layer>.<block>.experts.<e>.<gate|up|down>.weight`.

    transformers 5 fuses them into `mlp.experts.gate_up_proj` / `down_proj` when it loads, and still
    writes this layout when it saves; the 4-bit loader reads it tensor by tensor.
    """

    block: str  # the checkpoint's name for the module transformers 5 calls `mlp`
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # a class of `transformers`
    model_types: tuple[str, ...]  # the `model_type` of its config.json
    reference: dict[str, Any]  # config fields of the reference checkpoint (shape-relevant ones)
    calibration: str  # whose measured activation coefficients fine_tune.plan applies
    decoder_layer: str  # the transformers class of one decoder layer: FSDP shards (and gathers) by it
    expert_intermediate_key: str = "intermediate_size"  # config field: width of one expert
    checkpoint_experts: CheckpointExperts | None = None
    # PEFT maps transformers-4 names onto this family's fused layout, so `all-linear` also adapts the
    # router and (when they are not 4-bit) the fused experts.
    peft_remaps_moe: bool = False

    def config(self, **values: Any) -> Any:
        """The transformers config of a model of this family (imports transformers)."""
        import transformers

        return getattr(transformers, self.config_class)(**values)


@cache
def families() -> dict[str, Family]:
    """Every family, by name: each module of this package that defines `FAMILY`."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, Family):
            found[family.name] = family
    return found


def get_family(name: str) -> Family:
    try:
        return families()[name]
    except KeyError:
        raise UserError(
            f"unknown model family '{name}'",
            where="model.family",
            hint=f"use one of {sorted(families())}, or add one in fine_tune/families/",
        ) from None


def family_of(values: Mapping[str, Any]) -> Family | None:
    """The family whose checkpoints carry this config.json `model_type`, if one does."""
    model_type = values.get("model_type")
    return next((f for f in families().values() if model_type in f.model_types), None)


def expert_count(values: Mapping[str, Any]) -> int:
    """Experts per MoE layer, from config fields (a config.json, an architecture node, `to_dict()`)."""
    return int(next((values[k] for k in EXPERT_COUNT_KEYS if values.get(k)), 0))


def is_moe(values: Mapping[str, Any]) -> bool:
    """The one MoE test: more than one expert per MoE layer."""
    return expert_count(values) > 1


def checkpoint_experts(values: Mapping[str, Any]) -> CheckpointExperts:
    """How this checkpoint stores its experts; a UserError for a layout no family describes."""
    family = family_of(values)
    if family is None or family.checkpoint_experts is None:
        raise UserError(
            f"the 4-bit MoE loader does not know how '{values.get('model_type')}' checkpoints store "
            "their experts",
            where="model.name_or_path",
            hint="set quant.quant_experts=false (experts stay bf16, loaded by transformers), or describe "
            "the family in fine_tune/families/ (docs/contracts.md)",
        )
    return family.checkpoint_experts
