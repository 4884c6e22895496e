"""LoRA layers computed as one autograd function: base matmul, dropout, x A^T B^T and its scale.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate autograd nodes, so every
adapted linear pays, per forward, a clone of the base output (4-bit layers), a multiply by the
scale and an add over the full [tokens, out] activation, and in the backward the scale's multiply
again and an add of the adapter's input gradient to the base's. On an H100 those elementwise
kernels over 7 projections x 32 layers took ~150 ms of an ~890 ms QLoRA step (docs/speed.md).

Here the adapter's output is added by the GEMM itself (`addmm_`, scale as its alpha) and the input
gradient of the base and of the adapter accumulate in one buffer the same way; dropout keeps
PyTorch's kernel and mask (the same random draws as PEFT's `nn.Dropout`). What is trained does not
change: tests/test_fused_lora.py compares losses and every adapter gradient with PEFT's on CPU.

Only plain LoRA on `nn.Linear` and bitsandbytes' `Linear4bit` bases is fused; anything else (DoRA,
trainable biases, merged or disabled adapters, several active adapters, int8 bases) runs PEFT's own
forward. Swapped in for a training or evaluation step only (`swapped_forwards`), like
`EngineMixin.lora_inputs_uncast`: samples and exports see PEFT's modules untouched.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch


def _same_dtypes(x: torch.Tensor, adapter_weight: torch.Tensor) -> bool:
    """Whether PEFT's adapter matmuls would run in x's dtype: autocast's dtype, else the adapter
    weights' (PEFT casts x to them). Elsewhere PEFT's forward runs, with its casts."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.dtype == torch.get_autocast_dtype(device)
    return x.dtype == adapter_weight.dtype


class _Base:
    """The frozen base layer's two products: y = x W^T (+ b) and dL/dx = g W."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return torch.nn.functional.linear(x, layer.weight.to(x.dtype), bias)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad @ self.layer.weight.to(grad.dtype)


class _Base4bit(_Base):
    """bitsandbytes' `Linear4bit` as its own forward computes it (input cast to the layer's compute
    dtype, output back to the input's); the backward dequantizes again, as bitsandbytes' does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        layer = self.layer
        compute = layer.compute_dtype or x.dtype
        bias = None if layer.bias is None else layer.bias.to(compute)
        out = bnb.matmul_4bit(x.to(compute), layer.weight, bias=bias, quant_state=layer.weight.quant_state)
        return out.to(x.dtype)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        layer = self.layer
        compute = layer.compute_dtype or grad.dtype
        weight = dequantize_4bit(layer.weight.view(-1, 1), layer.weight.quant_state).to(compute)
        return (grad.to(compute) @ weight).to(grad.dtype)


class LoraLinear(torch.autograd.Function):
    """y = base(x) + scale * dropout(x) A^T B^T, with x in the compute dtype and A, B cast to it."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base: _Base, scale: float, dropout: float):  # noqa: ANN001
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        out = base.forward(x2)
        mask = None
        if dropout > 0:
            x2, mask = torch.native_dropout(x2, dropout, True)
        low = x2 @ a.t()
        out.addmm_(low, b.t(), alpha=scale)
        ctx.base, ctx.scale, ctx.dropout, ctx.shape = base, scale, dropout, shape
        ctx.dtypes = lora_a.dtype, lora_b.dtype  # the gradients' (fp32 adapters under autocast)
        ctx.save_for_backward(x2, mask, low, a, b)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x2, mask, low, a, b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_low = g2 @ (b * ctx.scale)
        grad_x = grad_a = grad_b = None
        if need_a:
            grad_a = (grad_low.t() @ x2).to(ctx.dtypes[0])
        if need_b:
            grad_b = (g2.t() @ low).mul_(ctx.scale).to(ctx.dtypes[1])
        if need_x:
            grad_x = ctx.base.input_grad(g2)
            if mask is None:
                grad_x.addmm_(grad_low, a)
            else:
                grad_x.addcmul_(grad_low @ a, mask, value=1.0 / (1.0 - ctx.dropout))
            grad_x = grad_x.view(ctx.shape)
        return grad_x, grad_a, grad_b, None, None, None


def _adapter(module: Any) -> str | None:
    """The one plain-LoRA adapter this PEFT layer can fuse, or None (then PEFT's forward runs)."""
    names = list(module.lora_A.keys())
    if len(names) != 1 or names[0] in getattr(module, "lora_variant", {}):
        return None
    name = names[0]
    base = module.get_base_layer()
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    plain = isinstance(module.lora_A[name], torch.nn.Linear) and module.lora_B[name].bias is None
    return name if frozen and plain else None


def _fused_forward(module: Any, name: str, base: _Base, peft_forward: Any) -> Any:
    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        fusable = not (args or kwargs or self.disable_adapters or self.merged) and (
            list(self.active_adapters) == [name] and _same_dtypes(x, a)
        )
        if not fusable:
            return peft_forward(x, *args, **kwargs)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        return LoraLinear.apply(x, a, b, base, self.scaling[name], p)

    return types.MethodType(forward, module)


def fusable_layers(model: Any) -> Iterator[tuple[Any, str, _Base]]:
    """PEFT's LoRA layers of `model` that `LoraLinear` computes, with their adapter and base."""
    from peft.tuners.lora.layer import Linear

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes missing: no 4-bit layers either
        Linear4bit = ()  # noqa: N806
    for module in model.modules():
        kind = _Base4bit if isinstance(module, Linear4bit) else _Base if type(module) is Linear else None
        name = _adapter(module) if kind else None
        state = getattr(module.get_base_layer().weight, "quant_state", None) if name else None
        # a 4-bit weight needs its quantization state, in the layout every device computes with
        # (fine_tune.models.quant.pin_portable_4bit_layout)
        portable = state is not None and not getattr(state, "packing_format_for_cpu", False)
        if name and (kind is _Base or portable):
            yield module, name, kind(module.get_base_layer())


def fused_forwards(model: Any) -> list[tuple[Any, Any]]:
    """Each fusable LoRA layer of `model` with its `LoraLinear` forward. Built once per trainer:
    the same forwards every step walk no modules and keep `torch.compile`'s guards valid."""
    layers = fusable_layers(model)
    return [(module, _fused_forward(module, name, base, module.forward)) for module, name, base in layers]


@contextlib.contextmanager
def swapped_forwards(forwards: list[tuple[Any, Any]]) -> Iterator[None]:
    """Within the block, each module computes through its given forward."""
    for module, forward in forwards:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in forwards:
            del module.forward
