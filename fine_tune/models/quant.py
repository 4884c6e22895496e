"""Weight quantization settings: the `quant` group becomes a `BitsAndBytesConfig` (or None)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fine_tune.schema import QuantSchema, default


@dataclass
class QuantSpec:
    """What the loaders need: the transformers config plus what bitsandbytes' config cannot carry
    to fine_tune's own 4-bit experts and layer-by-layer loader."""

    kind: str
    bnb_config: Any  # transformers.BitsAndBytesConfig | None
    quant_experts: bool = False
    double_quant: bool = False
    compute_dtype: Any = None
    skip_modules: tuple[str, ...] = ()  # kept in full precision ((): as from_pretrained chooses)
    storage_dtype: Any = None  # torch dtype the packed 4-bit values are stored in

    @property
    def is_4bit(self) -> bool:
        return self.kind in ("nf4", "fp4")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


def build_quant_config(
    kind: str = default(QuantSchema, "kind"),
    double_quant: bool = default(QuantSchema, "double_quant"),
    compute_dtype: str = default(QuantSchema, "compute_dtype"),
    quant_experts: bool = default(QuantSchema, "quant_experts"),
    skip_modules: Sequence[str] = default(QuantSchema, "skip_modules"),
    storage_dtype: str = default(QuantSchema, "storage_dtype"),
    threshold: float = default(QuantSchema, "threshold"),
) -> QuantSpec:
    """The `quant` node (validated by fine_tune.schema) as a QuantSpec; imports torch only when on."""
    if kind == "none":
        return QuantSpec(kind="none", bnb_config=None)
    import torch
    from transformers import BitsAndBytesConfig

    from fine_tune.hardware import resolve_dtype

    dtype = resolve_dtype(compute_dtype)
    skip = tuple(skip_modules or ())
    if kind == "int8":
        config = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=list(skip) or None
        )
        return QuantSpec(kind=kind, bnb_config=config, compute_dtype=dtype, skip_modules=skip)
    storage = getattr(torch, storage_dtype)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=list(skip) or None,
    )
    return QuantSpec(
        kind=kind,
        bnb_config=config,
        quant_experts=quant_experts,
        double_quant=double_quant,
        compute_dtype=dtype,
        skip_modules=skip,
        storage_dtype=storage,
    )
