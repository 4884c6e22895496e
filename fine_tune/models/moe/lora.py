"""LoRA on 4-bit fused experts, with the rank you ask for.

Why not PEFT: `target_parameters` wraps a 3-D `nn.Parameter` with a parametrization that adds
the full [E, out, in] delta to the weight, which needs the weight as a real float tensor (our
experts are packed 4-bit buffers) and materializes the whole expert stack per forward; PEFT's
older `target_modules=["w1","w2","w3"]` remap on fused models doubles the rank silently. Here each
expert e gets its own rank-r pair and the update is computed on the tokens routed to it:
`y_e += scaling * B_e @ A_e @ dropout(x_e)` -- dropout is exact in this form, unlike PEFT's --
as `x A^T` then `B`, never the [out, in] product: per expert (`forward`, the loop kernel) or for all
experts in two grouped matmuls (`grouped_down` / `grouped_up`, the grouped kernel).

Tensor layout per adapted tensor: `A` [E, r, in], `B` [E, out, r]. PEFT's `ParamWrapper` holds the
same numbers as lora_A.weight [E*r, in] and lora_B.weight [out, r*E] (`to_peft` / `from_peft`), and
that is how they are saved (adapter_files.py), so plain PEFT loads them onto unquantized experts.
The parameter names avoid the substring "lora_" so that PEFT's own save/load never picks them up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .experts4bit import Experts4bit
from .grouped import SortedRouting, grouped_mm, pad_for_grouped_mm


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The adapter's matmul dtype: autocast's where it is on (as `F.linear` would pick), else the
    adapter weights' own (float32 adapters on bf16 activations compute in float32, unrounded)."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class ExpertLoRA(nn.Module):
    """Rank-r adapters for every expert of one fused tensor."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        # PEFT's init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0 (start at identity)
        bound = 1.0 / math.sqrt(in_features)
        self.A = nn.Parameter(
            torch.empty(num_experts, r, in_features, dtype=dtype, device=device).uniform_(-bound, bound)
        )
        self.B = nn.Parameter(torch.zeros(num_experts, out_features, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        h = self.dropout(x).to(compute_dtype(x, self.A))
        return F.linear(F.linear(h, self.A[expert]), self.B[expert]) * self.scaling

    def grouped_down(self, x: torch.Tensor, routing: SortedRouting) -> torch.Tensor:
        """`scaling * dropout(x) A_e^T` for rows sorted by expert: [S, r'] (r' = r padded to the
        grouped kernel's alignment with zeros). The scaling sits on A (E x r x in numbers) rather
        than on the [S, out] result. An expert with no rows gets exactly zero gradient (a guard for
        grouped kernels that write garbage into empty groups' weight gradients, pytorch#172439)."""
        dtype = compute_dtype(x, self.A)
        a = torch.where(routing.routed[:, None, None], self.A, self.A.detach()) * self.scaling
        a = pad_for_grouped_mm(a.to(dtype), dim=1)
        return grouped_mm(self.dropout(x).to(dtype), a.transpose(1, 2), routing.offsets)

    def grouped_up(
        self, low_rank: torch.Tensor, routing: SortedRouting, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """`low_rank B_e^T` for the output rows `rows` (default: all) of each expert: [S, n]."""
        b = torch.where(routing.routed[:, None, None], self.B, self.B.detach())
        if rows is not None:
            b = b[:, rows[0] : rows[1]]
        b = pad_for_grouped_mm(b.to(low_rank.dtype), dim=2)
        return grouped_mm(low_rank, b.transpose(1, 2), routing.offsets)

    def peft_layout(self) -> dict[str, torch.Tensor]:
        """The same adapter as PEFT `ParamWrapper` stores it (lora_A.weight, lora_B.weight)."""
        lora_a, lora_b = to_peft(self.A.detach(), self.B.detach())
        return {"lora_A.weight": lora_a, "lora_B.weight": lora_b}


def to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [E, r, in], B [E, out, r]) -> PEFT's (lora_A.weight [E*r, in], lora_B.weight [out, r*E]):
    row e*r + k of lora_A and column k*E + e of lora_B belong to expert e."""
    e, r, i = a.shape
    return a.reshape(e * r, i), b.permute(1, 2, 0).reshape(b.shape[1], r * e)


def from_peft(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `to_peft`."""
    rows, i = lora_a.shape
    r = rows // num_experts
    return lora_a.reshape(num_experts, r, i), lora_b.reshape(lora_b.shape[0], r, num_experts).permute(2, 0, 1)


def experts_modules(model: nn.Module) -> list[tuple[str, Experts4bit]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Experts4bit)]


def attach_expert_lora(
    model: nn.Module,
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    which: Iterable[str] = ("gate_up_proj", "down_proj"),
    use_rslora: bool = False,
    dtype: torch.dtype | str = torch.float32,
) -> int:
    """Give every `Experts4bit` of `model` rank-r adapters on the tensors in `which`.

    Call it after PEFT has wrapped the model (PEFT freezes every parameter it did not create when
    it wraps, so adapters attached before would be frozen). Adapters are created trainable, in
    float32 by default like PEFT's QLoRA adapters, and switch off with PEFT's own adapters
    (`switch_with_peft`). Returns the number of adapter parameters.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    which = tuple(which)
    modules = experts_modules(model)
    if not modules:
        raise ValueError("no 4-bit experts in this model: quantize them first (quantize_fused_experts)")
    added = 0
    for _, mod in modules:
        device = mod.quant_code.device
        for name in which:
            if name not in mod.shapes:
                raise ValueError(f"unknown expert tensor {name!r}; known: {sorted(mod.shapes)}")
            out_f, in_f = mod.shapes[name]
            adapter = ExpertLoRA(
                mod.num_experts, in_f, out_f, r, lora_alpha, lora_dropout, use_rslora, dtype, device
            )
            mod.adapters[name] = adapter
            added += sum(p.numel() for p in adapter.parameters())
    switch_with_peft(model)
    return added


def switch_with_peft(model: nn.Module) -> None:
    """Make PEFT's adapter switch turn the expert adapters off and on with its own layers.

    `with peft_model.disable_adapter():` must give the base model: TRL's DPO computes its reference
    that way, and a test compares against it. PEFT switches only its tuner layers (its LoRA model's
    `_enable_adapter_layers` visits them); the expert adapters are ours, so this wraps that method
    of this model's tuner to set `Experts4bit.adapters_enabled` too. A no-op on a model PEFT has
    not wrapped (or already extended).
    """
    tuner = getattr(model, "base_model", None)
    peft_switch = getattr(tuner, "_enable_adapter_layers", None)
    if peft_switch is None or getattr(peft_switch, "switches_experts", False):
        return

    def switch(enabled: bool = True) -> None:
        peft_switch(enabled)
        for _, mod in experts_modules(tuner):
            mod.adapters_enabled = enabled

    switch.switches_experts = True  # type: ignore[attr-defined]
    tuner._enable_adapter_layers = switch


def expert_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed `<experts module path>.<tensor>.A|B`, path as in the unwrapped model."""
    out: dict[str, torch.Tensor] = {}
    for path, mod in experts_modules(model):
        path = canonical_path(path)
        for name, adapter in mod.adapters.items():
            out[f"{path}.{name}.A"] = adapter.A.detach()
            out[f"{path}.{name}.B"] = adapter.B.detach()
    return out


PEFT_PREFIX = "base_model.model."  # what PEFT's wrapper puts before the model's own module names


def canonical_path(path: str) -> str:
    """Strip PEFT's wrapper prefix so names do not depend on whether PEFT wrapped the model."""
    return path.removeprefix(PEFT_PREFIX)
