"""Expert adapters on disk in PEFT's own format, so that plain PEFT loads every trained number.

Why: PEFT cannot train LoRA on our 4-bit experts (see lora.py), but it loads and merges LoRA on
unquantized fused experts (`target_parameters`, its `ParamWrapper`). Writing our adapters in exactly
that layout makes the run's `adapter/` (and every checkpoint) a normal PEFT adapter:
`PeftModel.from_pretrained(bf16_base, dir)` loads attention and experts, `merge_and_unload()` folds
both in. fine_tune maps the same tensors back onto `Experts4bit` (generate, export, resume).

PEFT 0.21.2's layout for an adapted 3-D tensor [E, out, in] (E experts, rank r per expert):
- keys `base_model.model.<module path>[.base_layer]*.lora_A.weight` and `.lora_B.weight`: PEFT wraps
  the module once per adapted tensor, the tensor registered first innermost, so on Mixtral
  `gate_up_proj` lives under `experts.base_layer.lora_*` and `down_proj` under `experts.lora_*`;
- lora_A.weight [E*r, in] (row e*r + k), lora_B.weight [out, r*E] (column k*E + e);
- the adapter's one r and lora_alpha; scaling alpha/r, or alpha/sqrt(r) with use_rslora;
- adapter_config.json lists `target_parameters` (layer-relative, e.g. `mlp.experts.gate_up_proj`)
  and says `lora_dropout: 0`: ParamWrapper refuses dropout, and dropout does not change what is
  loaded (the run's .hydra/config.yaml keeps the value it trained with).

Runs written before this format kept the experts in `expert_adapter.safetensors` (A [E, r, in],
B [E, out, r], keys `<module path>.<tensor>.A|B`) + `expert_adapter_config.json` beside PEFT's
files; `read_peft_adapter` converts them in memory, so old runs load and export the same way.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fine_tune.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

from .experts4bit import EXPERT_PARAM_NAMES
from .lora import PEFT_PREFIX, attach_expert_lora, canonical_path, experts_modules, from_peft, to_peft

LEGACY_WEIGHTS = "expert_adapter.safetensors"
LEGACY_CONFIG = "expert_adapter_config.json"
_LAYER = re.compile(r"layers\.\d+\.(.+)$")


# ---- the layout ------------------------------------------------------------------------------------
def layer_relative(name: str) -> str:
    """`model.layers.3.mlp.experts.gate_up_proj` -> `mlp.experts.gate_up_proj` (what PEFT matches)."""
    match = _LAYER.search(name)
    return match.group(1) if match else name


def peft_prefix(module_path: str, name: str, adapted: Iterable[str]) -> str:
    """Key prefix of the LoRA on `<module_path>.<name>` when the tensors `adapted` of that module are
    targeted: one `.base_layer` per wrapper PEFT put around it (registered first = innermost)."""
    order = [n for n in EXPERT_PARAM_NAMES if n in set(adapted)]
    depth = len(order) - 1 - order.index(name)
    return PEFT_PREFIX + module_path + ".base_layer" * depth


def _module_targets(module_path: str, targets: Iterable[str]) -> list[str]:
    """The tensors of `module_path` that `target_parameters` names (PEFT's match: equal or suffix)."""
    targets = list(targets)
    return [
        n
        for n in EXPERT_PARAM_NAMES
        if any(f"{module_path}.{n}" == t or f"{module_path}.{n}".endswith(f".{t}") for t in targets)
    ]


def _is_expert_key(key: str, targets: Iterable[str]) -> bool:
    module = key.split(".lora_")[0]
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    return any(module.endswith("." + t.rpartition(".")[0]) for t in targets)


# ---- files -----------------------------------------------------------------------------------------
def has_expert_adapter(directory: str | Path) -> bool:
    """Whether an adapter directory holds expert adapters (either format)."""
    directory = Path(directory)
    if (directory / LEGACY_WEIGHTS).is_file():
        return True
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(config.get("target_parameters"))


def read_peft_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of an adapter directory as PEFT reads them, old format converted."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    if (directory / LEGACY_WEIGHTS).is_file():
        legacy = json.loads((directory / LEGACY_CONFIG).read_text())
        old = load_file(str(directory / LEGACY_WEIGHTS))
        for path in legacy["modules"]:
            for name in legacy["which"]:
                prefix = peft_prefix(path, name, legacy["which"])
                lora_a, lora_b = to_peft(old[f"{path}.{name}.A"], old[f"{path}.{name}.B"])
                tensors[f"{prefix}.lora_A.weight"] = lora_a.contiguous()
                tensors[f"{prefix}.lora_B.weight"] = lora_b.contiguous()
        names = {layer_relative(f"{p}.{n}") for p in legacy["modules"] for n in legacy["which"]}
        _declare_targets(config, names, legacy)
    return config, tensors


def write_peft_adapter(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """adapter_config.json + adapter_model.safetensors, each replaced in one rename."""
    from safetensors.torch import save_file

    from fine_tune.utils.io import atomic_file, atomic_write_json

    directory = Path(directory)
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_file(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(plain, str(tmp), metadata={"format": "pt"})
    atomic_write_json(directory / ADAPTER_CONFIG, config)


def _declare_targets(config: dict, names: Iterable[str], settings: dict) -> None:
    """Add the experts to a PEFT config, refusing what one PEFT config cannot say."""
    for key in ("r", "lora_alpha"):
        if not math.isclose(float(settings[key]), float(config[key])):
            raise ValueError(
                f"expert adapters have {key}={settings[key]} but PEFT's config says {config[key]}: "
                "PEFT's format holds one value for the whole adapter"
            )
    if bool(settings.get("use_rslora", False)) != bool(config.get("use_rslora", False)):
        raise ValueError("expert adapters and PEFT's config disagree on use_rslora")
    config["target_parameters"] = sorted({*(config.get("target_parameters") or []), *names})
    config["lora_dropout"] = 0.0  # PEFT's ParamWrapper refuses dropout; it changes nothing loaded


# ---- the model's adapters <-> files ---------------------------------------------------------------
def _settings(model: nn.Module) -> dict:
    adapters = [a for _, m in experts_modules(model) for a in m.adapters.values()]
    if not adapters:
        raise ValueError("the model has no expert adapters to save")
    first = adapters[0]
    return {
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "use_rslora": not math.isclose(first.scaling, first.lora_alpha / first.r),
    }


def expert_peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's expert adapters under PEFT's keys, in PEFT's layout."""
    out: dict[str, torch.Tensor] = {}
    for path, mod in experts_modules(model):
        path = canonical_path(path)
        for name, adapter in mod.adapters.items():
            prefix = peft_prefix(path, name, mod.adapters.keys())
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = to_peft(adapter.A, adapter.B)
    return out


def save_expert_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Add the model's expert adapters to the PEFT adapter PEFT's `save_pretrained` just wrote."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{directory} holds no PEFT adapter: save PEFT's files first (save_pretrained)")
    config, tensors = read_peft_adapter(directory)
    experts = expert_peft_tensors(model)
    clash = set(experts) & set(tensors)
    if clash:
        raise ValueError(f"PEFT's adapter already holds {sorted(clash)[:2]}")
    names = {
        layer_relative(f"{canonical_path(p)}.{n}") for p, m in experts_modules(model) for n in m.adapters
    }
    _declare_targets(config, names, _settings(model))
    write_peft_adapter(directory, config, {**tensors, **experts})
    for legacy in (LEGACY_WEIGHTS, LEGACY_CONFIG):  # a checkpoint resaved in place: one format only
        (directory / legacy).unlink(missing_ok=True)
    return directory / ADAPTER_WEIGHTS


def load_expert_adapter(model: nn.Module, directory: str | Path, trainable: bool = False) -> int:
    """Attach (if needed) and fill the model's 4-bit expert adapters from an adapter directory.

    Every expert tensor of the file must land in the model and every adapted tensor of the model
    must come from the file, with equal shapes and scaling: a partial load would serve or train a
    different adapter than the one saved. Returns the number of tensors loaded.
    """
    config, tensors = read_peft_adapter(directory)
    targets = config.get("target_parameters") or []
    if not targets:
        raise ValueError(f"{directory} holds no expert adapters ({ADAPTER_CONFIG}: no target_parameters)")
    modules = {canonical_path(p): m for p, m in experts_modules(model)}
    plan = {path: _module_targets(path, targets) for path in modules}
    plan = {path: names for path, names in plan.items() if names}
    if not plan:
        raise ValueError(f"{directory}: target_parameters {targets} match no 4-bit experts of this model")
    if not all(len(modules[path].adapters) for path in plan):
        attach_expert_lora(
            model,
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            which=sorted({n for names in plan.values() for n in names}),
            use_rslora=config.get("use_rslora", False),
        )
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    expected: set[str] = set()
    for path, names in plan.items():
        mod = modules[path]
        for name in names:
            prefix = peft_prefix(path, name, names)
            keys = (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ValueError(f"{directory}: the adapter lacks {missing[0]}")
            expected.update(keys)
            adapter = mod.adapters[name]
            if not math.isclose(adapter.scaling, scale):
                raise ValueError(f"{path}.{name}: scaling {adapter.scaling} != the file's {scale}")
            values = from_peft(tensors[keys[0]], tensors[keys[1]], mod.num_experts)
            for param, value in zip((adapter.A, adapter.B), values, strict=True):
                if tuple(param.shape) != tuple(value.shape):
                    raise ValueError(f"{prefix}: shape {tuple(value.shape)} != model {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(value)
                param.requires_grad_(trainable)
    extra = sorted(k for k in tensors if _is_expert_key(k, targets) and k not in expected)
    if extra:
        raise ValueError(f"{directory}: expert adapter tensors this model lacks: {extra[:4]}")
    return len(expected)


def load_adapter(base: nn.Module, directory: str | Path, is_trainable: bool = False) -> Any:
    """`PeftModel.from_pretrained` that also takes the expert adapters, whatever the base holds.

    Unquantized experts: PEFT loads everything itself (`target_parameters`). 4-bit experts: PEFT
    loads the rest with the experts left out of its config, then our expert LoRA takes their tensors.
    """
    from peft import PeftConfig, PeftModel

    directory = Path(directory)
    if experts_modules(base) and has_expert_adapter(directory):
        config = PeftConfig.from_pretrained(str(directory))
        config.target_parameters = None
        model = PeftModel.from_pretrained(base, str(directory), config=config, is_trainable=is_trainable)
        load_expert_adapter(model, directory, trainable=is_trainable)
        return model
    if not (directory / LEGACY_WEIGHTS).is_file():
        return PeftModel.from_pretrained(base, str(directory), is_trainable=is_trainable)
    with tempfile.TemporaryDirectory() as converted:  # an old run: PEFT reads the converted copy
        write_peft_adapter(converted, *read_peft_adapter(directory))
        return PeftModel.from_pretrained(base, converted, is_trainable=is_trainable)
