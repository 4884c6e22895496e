"""Weight quantization settings: the `quant` group becomes a `BitsAndBytesConfig` (or None)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fine_tune.schema import QuantSchema, default

#: bitsandbytes' per-layer switch for its CPU inference repacking (see `pin_portable_4bit_layout`)
CPU_REPACK_FLAG = "support_avx512bf16_for_cpu"


def upcasts_frozen(kind: str, upcast_frozen: bool, strategy: str) -> bool:
    """Whether a run takes PEFT's k-bit preparation (frozen non-quantized weights in fp32): asked for
    (quant.upcast_frozen) on a quantized base, and never under FSDP (fine_tune.adapters says why).
    The run (fine_tune.recipe) and the memory planner (fine_tune.plan) both ask here."""
    return kind != "none" and bool(upcast_frozen) and strategy != "fsdp"


@dataclass
class QuantSpec:
    """What the loaders need: the transformers config plus what bitsandbytes' config cannot carry
    to fine_tune's own 4-bit experts and layer-by-layer loader."""

    kind: str
    bnb_config: Any  # transformers.BitsAndBytesConfig | None
    quant_experts: bool = False
    expert_kernel: str = default(QuantSchema, "expert_kernel")  # Experts4bit.kernel
    double_quant: bool = False
    compute_dtype: Any = None
    skip_modules: tuple[str, ...] = ()  # kept in full precision ((): as from_pretrained chooses)
    storage_dtype: Any = None  # torch dtype the packed 4-bit values are stored in
    upcast_frozen: bool = False  # PEFT's k-bit preparation (fine_tune.adapters.prepare_for_adapter)

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
    expert_kernel: str = default(QuantSchema, "expert_kernel"),
    skip_modules: Sequence[str] = default(QuantSchema, "skip_modules"),
    storage_dtype: str = default(QuantSchema, "storage_dtype"),
    threshold: float = default(QuantSchema, "threshold"),
    upcast_frozen: bool = default(QuantSchema, "upcast_frozen"),
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
        return QuantSpec(
            kind=kind, bnb_config=config, compute_dtype=dtype, skip_modules=skip, upcast_frozen=upcast_frozen
        )
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
        expert_kernel=expert_kernel,
        double_quant=double_quant,
        compute_dtype=dtype,
        skip_modules=skip,
        storage_dtype=storage,
        upcast_frozen=upcast_frozen,
    )


def pin_portable_4bit_layout(model: Any) -> Any:
    """Keep every `Linear4bit` in the one weight layout all CPUs and GPUs compute with.

    bitsandbytes 0.50 on CPUs with AVX512-BF16 (recent Xeon and EPYC) rewrites a 4-bit weight in place
    the first time its layer runs in inference mode (an eval, a generation sample): the absmax
    constants are rounded to bf16 and the layer then computes in bf16 through a kernel without
    autograd, also in the training steps that follow (the gradient through the frozen weight to the
    layer's input is lost), and a later `state_dict()` re-quantizes the constants. What a run trains,
    saves and resumes would then depend on the CPU model and on whether an eval ran. Turning the
    switch off costs CPU inference speed on those CPUs only; GPUs never take that path.
    """
    for module in model.modules():
        if getattr(module, CPU_REPACK_FLAG, False):
            setattr(module, CPU_REPACK_FLAG, False)
    return model
