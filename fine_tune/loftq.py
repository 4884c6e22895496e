"""LoftQ initialisation of LoRA on a model already loaded in 4 bits (`lora.init_lora_weights=loftq`).

Why not PEFT's LoftQ: `LoraConfig(init_lora_weights="loftq")` quantizes the full-precision model
itself (it needs the whole model in float on the GPU, then a second load in 4 bits), and both it and
`replace_lora_weights_loftq` (the variant for a bitsandbytes model) compute on "cuda" whatever the
model's device, and ignore the LoRA scaling (peft#1982: with lora_alpha != r the adapter starts at
alpha/r times the quantization error instead of cancelling it). Here, as in
`replace_lora_weights_loftq`, each adapted `Linear4bit` keeps the 4-bit weight every `quant=nf4` load
of the checkpoint gives (one LoftQ iteration: the base is not re-quantized, so the saved adapter
loads on any standard 4-bit load of the same checkpoint), and its adapter starts as the best rank-r
approximation of the quantization error, `scaling * B @ A = SVD_r(W - dequant(Q(W)))`: the
model starts closer to the full-precision one than QLoRA's (which starts at Q(W)).

The full-precision weights are read one matrix at a time from the checkpoint's safetensors files
(`checkpoint_weights`), never the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from fine_tune.errors import UserError
from fine_tune.models.moe.lora import canonical_path

# (checkpoint key, shape) -> the full-precision weight
WeightSource = Callable[[str, tuple[int, ...]], torch.Tensor]


def checkpoint_weights(name_or_path: str | None, config: Any) -> WeightSource:
    """The full-precision weights of the checkpoint the model was loaded from (local or hub cache)."""
    if not name_or_path:
        raise UserError(
            "LoftQ needs the full-precision checkpoint the model was loaded from, and this model has none",
            where="lora.init_lora_weights",
            hint="load a checkpoint (model.init=pretrained), or use lora=default",
        )
    from fine_tune.models.moe.build import checkpoint_tensors

    tensors = checkpoint_tensors(name_or_path, config)

    def read(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            return tensors.tensor(key, shape, torch.float32, torch.device("cpu"), "normal")
        except KeyError:
            raise UserError(
                f"the checkpoint '{name_or_path}' has no tensor {key} for LoftQ",
                where="lora.init_lora_weights",
                hint="LoftQ reads the adapted weights from the checkpoint: use lora=default for this model",
            ) from None

    return read


def _lora_on_4bit(model: Any, adapter: str) -> Any:
    """(checkpoint key, LoRA layer, its dequantized 4-bit weight in fp32) of each LoRA on a 4-bit linear."""
    from peft.tuners.lora.bnb import Linear4bit
    from peft.utils.integrations import dequantize_module_weight

    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and adapter in module.lora_A:
            yield (
                f"{canonical_path(name)}.weight",
                module,
                dequantize_module_weight(module.get_base_layer()).float(),
            )


@torch.no_grad()
def loftq_initialise(model: Any, weights: WeightSource, adapter: str = "default") -> int:
    """Set A and B of every LoRA on a 4-bit linear of the PEFT `model` from its quantization error.

    Returns the number of layers initialised (a model without one is a configuration error that
    validation refuses first: LoftQ needs quant=nf4 or fp4).
    """
    done = 0
    for key, module, quantized in _lora_on_4bit(model, adapter):
        error = weights(key, tuple(quantized.shape)).to(quantized.device, torch.float32) - quantized
        lora_a, lora_b = low_rank_factors(error, module.r[adapter], module.scaling[adapter])
        module.lora_A[adapter].weight.copy_(lora_a)
        module.lora_B[adapter].weight.copy_(lora_b)
        done += 1
    if not done:
        raise UserError(
            "LoftQ found no LoRA layer on a 4-bit weight",
            where="lora.init_lora_weights",
            hint="use quant=nf4 with target_modules on the model's linear layers",
        )
    return done


def low_rank_factors(matrix: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with scaling * B @ A the best rank-r approximation of `matrix` [out, in];
    the singular values are split evenly between B and A, as PEFT's PiSSA does."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = (s[:r] / scaling).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


@torch.no_grad()
def quantization_error(model: Any, weights: WeightSource, adapter: str = "default") -> float:
    """Frobenius norm of (full precision - what the model computes with) over its 4-bit LoRA layers:
    how far LoftQ moved the start from the full-precision model (tests, benchmarks)."""
    total = 0.0
    for key, module, quantized in _lora_on_4bit(model, adapter):
        delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight
        effective = quantized + module.scaling[adapter] * delta.float()
        full = weights(key, tuple(effective.shape))
        total += float((full.to(effective.device).float() - effective).pow(2).sum())
    return math.sqrt(total)
