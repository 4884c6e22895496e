"""LoRA on 4-bit fused experts, with the rank you ask for.

Why not PEFT: `target_parameters` wraps a 3-D `nn.Parameter` with a parametrization that adds
the full [E, out, in] delta to the weight, which needs the weight as a real float tensor (our
experts are packed 4-bit buffers) and materializes the whole expert stack per forward; PEFT's
older `target_modules=["w1","w2","w3"]` remap on fused models doubles the rank silently. Here each
expert e gets its own rank-r pair and the update is computed on the tokens routed to it:
`y_e += scaling * B_e @ A_e @ dropout(x_e)` -- dropout is exact in this form, unlike PEFT's.

Tensor layout per adapted tensor: `A` [E, r, in], `B` [E, out, r] (PEFT's `ParamWrapper` keeps the
same numbers as lora_A.weight [E*r, in] = A.reshape(E*r, in) and lora_B.weight [out, r*E] =
B.permute(1, 2, 0).reshape(out, r*E)); `peft_layout()` converts.

Save format (`save_expert_adapter`): `expert_adapter.safetensors` with keys
`<module path>.<tensor name>.A|B`, and `expert_adapter_config.json` {r, lora_alpha, lora_dropout,
which, use_rslora, modules}. It sits beside PEFT's own adapter files in the same directory, and the
parameter names avoid the substring "lora_" so that PEFT's own save/load never picks them up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .experts4bit import Experts4bit

EXPERT_ADAPTER_FILE = "expert_adapter.safetensors"
EXPERT_ADAPTER_CONFIG = "expert_adapter_config.json"


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
        h = self.dropout(x).to(self.A.dtype)
        return F.linear(F.linear(h, self.A[expert]), self.B[expert]) * self.scaling

    def peft_layout(self) -> dict[str, torch.Tensor]:
        """The same adapter as PEFT `ParamWrapper` stores it (lora_A.weight, lora_B.weight)."""
        e, r, i = self.A.shape
        o = self.B.shape[1]
        return {
            "lora_A.weight": self.A.detach().reshape(e * r, i),
            "lora_B.weight": self.B.detach().permute(1, 2, 0).reshape(o, r * e),
        }


def _experts_modules(model: nn.Module) -> list[tuple[str, Experts4bit]]:
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
    float32 by default like PEFT's QLoRA adapters. Returns the number of adapter parameters.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    which = tuple(which)
    modules = _experts_modules(model)
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
    return added


def expert_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed `<experts module path>.<tensor>.A|B`, path as in the unwrapped model."""
    out: dict[str, torch.Tensor] = {}
    for path, mod in _experts_modules(model):
        path = _canonical(path)
        for name, adapter in mod.adapters.items():
            out[f"{path}.{name}.A"] = adapter.A.detach()
            out[f"{path}.{name}.B"] = adapter.B.detach()
    return out


def _canonical(path: str) -> str:
    """Strip PEFT's wrapper prefixes so the file does not depend on whether PEFT wrapped the model."""
    for prefix in ("base_model.model.",):
        if path.startswith(prefix):
            path = path[len(prefix) :]
    return path


def _adapter_config(model: nn.Module) -> dict:
    modules = _experts_modules(model)
    adapters = [a for _, m in modules for a in m.adapters.values()]
    if not adapters:
        raise ValueError("the model has no expert adapters to save")
    first = adapters[0]
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "format": "fine_tune.expert_lora/1",
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": dropout,
        "use_rslora": not math.isclose(first.scaling, first.lora_alpha / first.r),
        "which": sorted({n for _, m in modules for n in m.adapters}),
        "dtype": str(first.A.dtype).removeprefix("torch."),
        "modules": [_canonical(p) for p, m in modules if len(m.adapters)],
    }


def save_expert_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the expert adapters (and their config) into `directory`, e.g. the PEFT adapter dir."""
    from safetensors.torch import save_file

    from fine_tune.utils.io import atomic_file, atomic_write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in expert_lora_state_dict(model).items()}
    path = directory / EXPERT_ADAPTER_FILE
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "fine_tune.expert_lora/1"})
    atomic_write_json(directory / EXPERT_ADAPTER_CONFIG, _adapter_config(model))
    return path


def load_expert_adapter(model: nn.Module, directory: str | Path, trainable: bool = False) -> int:
    """Attach (if needed) and fill expert adapters from `save_expert_adapter`'s files.

    Shapes and module paths must match exactly: a silent partial load would train or serve a
    different adapter than the one saved. Returns the number of tensors loaded.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / EXPERT_ADAPTER_CONFIG).read_text())
    tensors = load_file(str(directory / EXPERT_ADAPTER_FILE))
    modules = dict(_experts_modules(model))
    by_path = {_canonical(p): m for p, m in modules.items()}
    if not all(len(m.adapters) for m in by_path.values()):
        attach_expert_lora(
            model,
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            lora_dropout=config["lora_dropout"],
            which=config["which"],
            use_rslora=config.get("use_rslora", False),
            dtype=config.get("dtype", "float32"),
        )
    loaded = 0
    expected = set()
    for path, mod in by_path.items():
        for name, adapter in mod.adapters.items():
            for part in ("A", "B"):
                key = f"{path}.{name}.{part}"
                expected.add(key)
                if key not in tensors:
                    raise ValueError(f"expert adapter file lacks {key}")
                param = getattr(adapter, part)
                if tuple(param.shape) != tuple(tensors[key].shape):
                    raise ValueError(
                        f"{key}: shape {tuple(tensors[key].shape)} != model {tuple(param.shape)}"
                    )
                with torch.no_grad():
                    param.copy_(tensors[key])
                param.requires_grad_(trainable)
                loaded += 1
    extra = set(tensors) - expected
    if extra:
        raise ValueError(f"expert adapter file has tensors this model lacks: {sorted(extra)[:4]}")
    return loaded
