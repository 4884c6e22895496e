"""4-bit fused experts, LoRA on experts, and real-shape random/streamed model builders for MoE models.

transformers 5 stores MoE experts as fused 3-D parameters that bitsandbytes' loader never converts,
so a "4-bit" Mixtral keeps ~96% of its weights in bf16. This package quantizes those tensors per
expert, gives them a LoRA that PEFT's `target_parameters` cannot give a quantized tensor (saved in
PEFT's format all the same, so plain PEFT loads it on unquantized experts), builds or loads models
one layer at a time so the bf16 weights never sit in memory whole, and dequantizes them back.

Names resolve lazily: importing this package must stay cheap for `plan=true` and the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Experts4bit": "experts4bit",
    "quantize_fused_experts": "experts4bit",
    "count_parameters": "experts4bit",
    "ExpertLoRA": "lora",
    "attach_expert_lora": "lora",
    "expert_lora_state_dict": "lora",
    "save_expert_adapter": "adapter_files",
    "load_expert_adapter": "adapter_files",
    "load_adapter": "adapter_files",
    "read_peft_adapter": "adapter_files",
    "write_peft_adapter": "adapter_files",
    "dequantize_model": "dequantize",
    "build_random_model": "build",
    "load_pretrained_moe_4bit": "build",
    "replace_linear_with_4bit": "build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
