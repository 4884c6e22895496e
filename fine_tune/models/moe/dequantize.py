"""A 4-bit model back to plain float weights, one tensor at a time.

Why: merging a QLoRA adapter into the weights it was trained against (`export merge=true
base=dequantized`) and comparing a 4-bit model with plain transformers on the same base both need
an ordinary transformers model whose weights are exactly the dequantized 4-bit ones. The walk is
`build.py`'s (meta skeleton, materialized module by module), with the 4-bit model as the source:
`Linear4bit` and `Experts4bit` dequantized, everything else copied. Only one dequantized tensor
is alive beside the result, so the 4-bit model may stay on a GPU while the float one fills host RAM.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .build import _materialize, _skeleton
from .experts4bit import Experts4bit


class _DequantizedSource:
    """`_materialize`'s tensor source reading a quantized model of the same architecture."""

    def __init__(self, quantized: nn.Module, skeleton: nn.Module) -> None:
        self.source = dict(quantized.named_modules())
        self.target = dict(skeleton.named_modules())

    def tensor(self, key: str, shape: Any, dtype: torch.dtype, device: torch.device, kind: str) -> Any:
        path, _, name = key.rpartition(".")
        module = self.source[path]
        if isinstance(module, Experts4bit):
            value = module.dequantize(name, dtype=torch.float32)  # [E, out, in]
            if getattr(self.target[path], "is_transposed", False):
                value = value.transpose(1, 2)
        else:
            value = getattr(module, name)
        if type(value).__name__ == "Params4bit":
            import bitsandbytes.functional as bnbf

            value = bnbf.dequantize_4bit(value.data, value.quant_state)
        elif type(value).__name__ == "Int8Params":
            raise ValueError(f"{key}: only 4-bit (nf4/fp4) weights can be dequantized here")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{key}: dequantized shape {tuple(value.shape)} != model {tuple(shape)}")
        return value.detach().to(device=device, dtype=dtype)


def dequantize_model(
    model: nn.Module, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """A plain transformers model (no bitsandbytes, no `Experts4bit`) with `model`'s weights in `dtype`.

    `model` is a base model without adapters; `dtype` defaults to the dtype of its unquantized
    tensors. The result has no `quantization_config`, so `save_pretrained` writes a checkpoint
    that plain `from_pretrained` loads in full precision.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    config = copy.deepcopy(model.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = _skeleton(config, dtype, getattr(config, "_attn_implementation", None))
    _materialize(
        plain,
        _DequantizedSource(model, plain),
        device=torch.device(device),
        dtype=dtype,
        quant=None,
    )
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()
