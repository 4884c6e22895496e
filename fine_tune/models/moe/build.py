"""Build or load a causal LM one layer at a time, quantizing as it goes.

Why: Mixtral-8x7B in bf16 is ~87 GiB, more than the GPU and more than the GPU machines' disk.
`build_random_model` makes real-shape models with random weights (benchmarks, planning checks on
machines without a checkpoint) and `load_pretrained_moe_4bit` streams a real safetensors checkpoint;
both start from a skeleton on the meta device and materialize one module at a time directly on the
target device, quantizing `nn.Linear` (as bitsandbytes' `from_pretrained` would) and the fused
experts (which `from_pretrained` would leave bf16) before the next piece is made. The largest bf16
tensor ever alive is one expert matrix; nothing is written to disk.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fine_tune.errors import UserError
from fine_tune.models.quant import pin_portable_4bit_layout

from .experts4bit import (
    DEFAULT_KERNEL,
    count_parameters,
    find_fused_experts,
    format_counts,
    quantize_experts_module,
    set_submodule,
)

log = logging.getLogger(__name__)


def _dtype(value: torch.dtype | str | None, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    if value is None or value == "auto":
        return default
    return getattr(torch, value) if isinstance(value, str) else value


# ---- where tensors come from ------------------------------------------------------------------------
class _RandomSource:
    """Normal(0, std) weights, ones for norms: the statistics of HF's `_init_weights`."""

    def __init__(self, std: float, seed: int) -> None:
        self.std = std
        self.seed = seed
        self._count = 0

    def tensor(self, key: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device, kind: str):
        if kind == "ones":
            return torch.ones(shape, dtype=dtype, device=device)
        if kind == "zeros":
            return torch.zeros(shape, dtype=dtype, device=device)
        # one generator per tensor, seeded by position: reproducible whatever the device
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self._count)
        self._count += 1
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, self.std, generator=generator)

    def expert(
        self, path: str, name: str, e: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ):
        return self.tensor(f"{path}.{name}[{e}]", shape, dtype, device, "normal")


class _CheckpointSource:
    """Tensors read lazily (memory-mapped) from safetensors files, in either expert layout.

    transformers 5 saves MoE models in their family's per-expert layout (Mixtral:
    `block_sparse_moe.experts.{e}.w1|w3|w2`, see fine_tune.families) and fuses on load; fused
    checkpoints store `mlp.experts.gate_up_proj`. A per-expert layout no family describes is a
    UserError before anything loads.
    """

    def __init__(self, files: list[Path], config: Any) -> None:
        from safetensors import safe_open

        from fine_tune.families import checkpoint_experts, is_moe

        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        # safe_open handles are not iterable: keys() it is
        self.where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118
        self.used: set[str] = set()
        fused = any(k.endswith(".experts.gate_up_proj") for k in self.where)
        values = config.to_dict()
        self.experts = checkpoint_experts(values) if is_moe(values) and not fused else None

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise KeyError(key)
        self.used.add(key)
        return self.where[key].get_tensor(key)

    def _legacy(self, key: str) -> str:
        """The per-expert layout's name for `key` (its MoE block may not be called `mlp`)."""
        return key.replace(".mlp.", f".{self.experts.block}.") if self.experts else key

    def tensor(self, key: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device, kind: str):
        src = key if key in self.where else self._legacy(key)
        return _checked(self._get(src), src, shape).to(device=device, dtype=dtype)

    def expert(
        self, path: str, name: str, e: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ):
        fused = f"{path}.{name}"
        if fused in self.where:
            self.used.add(fused)
            t = self.where[fused].get_slice(fused)[e]
        else:
            legacy, names = self._legacy(path) + f".{e}", self.experts
            if name == "gate_up_proj":
                parts = [self._get(f"{legacy}.{names.gate}.weight"), self._get(f"{legacy}.{names.up}.weight")]
                t = torch.cat(parts, dim=0)
            elif name == "down_proj":
                t = self._get(f"{legacy}.{names.down}.weight")
            else:
                raise KeyError(fused)
        return _checked(t, f"{fused}[{e}]", shape).to(device=device, dtype=dtype)


def _checked(t: torch.Tensor, name: str, shape: Sequence[int]) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, model expects {tuple(shape)}")
    return t


# ---- materialization --------------------------------------------------------------------------------
def _init_kind(module: nn.Module, pname: str, param: torch.Tensor) -> str:
    if pname == "bias":
        return "zeros"
    if param.dim() == 1 and "norm" in type(module).__name__.lower():
        return "ones"
    return "normal"


def _linear4bit(
    linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, quant: dict, device: torch.device
) -> nn.Module:
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=bias is not None,
        compute_dtype=quant["compute_dtype"],
        compress_statistics=quant["double_quant"],
        quant_type=quant["quant_type"],
        quant_storage=quant["storage"],
        device="meta",
    )
    new.weight = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        compress_statistics=quant["double_quant"],
        quant_type=quant["quant_type"],
        quant_storage=quant["storage"],
        module=new,
    ).to(device)  # Params4bit quantizes when moved to a real device
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=False)
    return pin_portable_4bit_layout(new)


def _materialize(
    model: nn.Module,
    source: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quant: dict | None,
) -> None:
    """Give every meta tensor of `model` real storage on `device`, module by module."""
    config = model.config
    experts_4bit = bool(quant and quant["experts"])  # quant.quant_experts=false: experts stay `dtype`
    expert_paths = {name for name, _, reason in find_fused_experts(model) if experts_4bit and reason is None}
    for name, _, reason in find_fused_experts(model):
        if experts_4bit and reason is not None:
            log.warning("experts %s stay %s: %s is not supported by Experts4bit", name, dtype, reason)

    for mod_name, module in list(model.named_modules()):
        if any(mod_name.startswith(p + ".") for p in expert_paths):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if mod_name in expert_paths:

            def read(name: str, e: int, shape: Sequence[int], path: str = mod_name) -> torch.Tensor:
                return source.expert(path, name, e, shape, dtype, device)

            kinds = {k: quant[k] for k in ("quant_type", "double_quant", "compute_dtype", "kernel")}
            set_submodule(model, mod_name, quantize_experts_module(module, device=device, read=read, **kinds))
            continue
        if quant and isinstance(module, nn.Linear) and not _skipped(mod_name, quant):
            w = source.tensor(prefix + "weight", module.weight.shape, dtype, device, "normal")
            b = None
            if module.bias is not None:
                b = source.tensor(prefix + "bias", module.bias.shape, dtype, device, "zeros")
            set_submodule(model, mod_name, _linear4bit(module, w, b, quant, device))
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if (
                pname == "weight"
                and mod_name.endswith("lm_head")
                and getattr(config, "tie_word_embeddings", False)
            ):
                continue  # tied below
            t = source.tensor(prefix + pname, param.shape, dtype, device, _init_kind(module, pname, param))
            setattr(module, pname, nn.Parameter(t, requires_grad=param.requires_grad))
        meta_buffers = [n for n, b in module.named_buffers(recurse=False) if b.device.type == "meta"]
        if meta_buffers:
            # non-persistent buffers (rotary inv_freq) are computed, not stored: rebuild the module
            if not hasattr(module, "config"):
                raise RuntimeError(f"cannot rebuild buffers {meta_buffers} of {mod_name}")
            with torch.device(device):
                set_submodule(model, mod_name, type(module)(config=module.config))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()


def _skipped(name: str, quant: dict) -> bool:
    """A module `quant.skip_modules` keeps in full precision (matched by its last name parts)."""
    return any(name == s or name.endswith("." + s) for s in quant["skip_modules"])


def _finish(model: nn.Module, quant: dict | None, how: str, source: str = "") -> nn.Module:
    """Flag a quantized model as transformers' bnb loader does, so PEFT and the Trainer treat both
    paths alike (`prepare_model_for_kbit_training` enables checkpointing only on models flagged so),
    and count its parameters by storage for the log."""
    if quant is not None:
        model.is_loaded_in_4bit = True
    model.fine_tune_param_counts = count_parameters(model)
    log.info("%s %s%s: %s", how, type(model).__name__, source, format_counts(model.fine_tune_param_counts))
    return model


def _skeleton(config: Any, dtype: torch.dtype, attn_implementation: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def _quant(
    quant_type: Any, double_quant: bool, compute_dtype: torch.dtype | str | None, skip_modules: Any = None
) -> dict | None:
    """Normalize our arguments or the core's `QuantSpec` (whose skip_modules and storage dtype count
    too, as they do for bitsandbytes' from_pretrained) into what `_materialize` reads."""
    from fine_tune.schema import SKIP_MODULES

    storage, kernel, experts = None, DEFAULT_KERNEL, True
    if hasattr(quant_type, "kind"):  # fine_tune.models.quant.QuantSpec
        spec = quant_type
        quant_type, double_quant, compute_dtype = spec.kind, spec.double_quant, spec.compute_dtype
        skip_modules = skip_modules or spec.skip_modules
        storage, kernel, experts = spec.storage_dtype, spec.expert_kernel, spec.quant_experts
    if quant_type in (None, "none", False):
        return None
    if quant_type not in ("nf4", "fp4"):
        raise UserError(
            f"layer-by-layer building quantizes to nf4 or fp4, not {quant_type!r}",
            where="quant.kind",
            hint="use quant=nf4 (or fp4) for large random/streamed models, or quant=none",
        )
    return {
        "quant_type": quant_type,
        "double_quant": bool(double_quant),
        "compute_dtype": _dtype(compute_dtype),
        "skip_modules": tuple(skip_modules or SKIP_MODULES),  # empty: what from_pretrained skips
        "storage": _dtype(storage, torch.uint8),
        "kernel": kernel,
        "experts": bool(experts),
    }


def build_random_model(
    config: Any,
    quant_type: str | None = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    attn_implementation: str | None = "sdpa",
    seed: int = 0,
    skip_modules: Sequence[str] | None = None,
    quant: Any = None,
) -> nn.Module:
    """A real-shape model with random weights, quantized while it is built (no checkpoint, no disk).

    `config` is a transformers config (e.g. `MixtralConfig()` is Mixtral-8x7B). With `quant_type`
    nf4/fp4, `nn.Linear` layers become bitsandbytes `Linear4bit` (lm_head kept, as `from_pretrained`
    with a BitsAndBytesConfig does) and fused experts become `Experts4bit`; with None all stays
    `dtype`. `quant` may be the core's `QuantSpec` instead of the three quant arguments. The
    model's `fine_tune_param_counts` attribute holds the 4-bit/other counts. `device` defaults
    to the current CUDA device when there is one.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(dtype)
    quant = _quant(quant if quant is not None else quant_type, double_quant, compute_dtype, skip_modules)
    model = _skeleton(config, dtype, attn_implementation)
    std = float(getattr(config, "initializer_range", 0.02))
    _materialize(model, _RandomSource(std, seed), device=device, dtype=dtype, quant=quant)
    return _finish(model, quant, "built random")


def _checkpoint_files(name_or_path: str | Path, revision: str | None) -> tuple[Path, list[Path]]:
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(
            snapshot_download(
                str(name_or_path), revision=revision, allow_patterns=["*.json", "*.safetensors"]
            )
        )
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"no safetensors weights in {path}",
            where="model.name_or_path",
            hint="layer-by-layer 4-bit loading reads .safetensors checkpoints only",
        )
    return path, files


def checkpoint_tensors(
    name_or_path: str | Path, config: Any, revision: str | None = None
) -> _CheckpointSource:
    """The tensors of a safetensors checkpoint, each read when asked for (LoftQ's full-precision
    weights: `tensors.tensor(key, shape, dtype, device, "normal")`)."""
    _, files = _checkpoint_files(name_or_path, revision)
    return _CheckpointSource(files, config)


def load_pretrained_moe_4bit(
    name_or_path: str | Path,
    quant_type: str | None = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cuda",
    dtype: torch.dtype | str = torch.bfloat16,
    attn_implementation: str | None = "sdpa",
    config_overrides: dict | None = None,
    revision: str | None = None,
    skip_modules: Sequence[str] | None = None,
    quant: Any = None,
) -> nn.Module:
    """Load a safetensors checkpoint with `nn.Linear` and fused experts in 4-bit, tensor by tensor.

    Each tensor is memory-mapped from disk, moved to `device`, quantized and dropped before the
    next; so GPU memory never holds more than the 4-bit model plus one bf16 matrix, and host
    memory holds only the page cache. Reads both expert layouts (legacy per-expert w1/w2/w3 and
    fused gate_up_proj/down_proj). Missing weights are an error, never silently random. `quant`
    may be the core's `QuantSpec` instead of the three quant arguments.
    """
    from transformers import AutoConfig

    device = torch.device(device)
    dtype = _dtype(dtype)
    root, files = _checkpoint_files(name_or_path, revision)
    config = AutoConfig.from_pretrained(str(root))
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    quant = _quant(quant if quant is not None else quant_type, double_quant, compute_dtype, skip_modules)
    model = _skeleton(config, dtype, attn_implementation)
    source = _CheckpointSource(files, config)
    try:
        _materialize(model, source, device=device, dtype=dtype, quant=quant)
    except KeyError as err:
        raise UserError(
            f"checkpoint {root} lacks weight {err}",
            where="model.name_or_path",
            hint="point it at a complete checkpoint (every *.safetensors file of it)",
        ) from None
    unused = sorted(k for k in set(source.where) - source.used if not re.search("rotary_emb|inv_freq", k))
    if unused:
        log.warning("%d checkpoint tensors not used, e.g. %s", len(unused), unused[:3])
    model.eval()
    return _finish(model, quant, "loaded", f" from {root}")


def replace_linear_with_4bit(
    model: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    skip_modules: Sequence[str] | None = None,
) -> int:
    """Quantize the `nn.Linear` layers of an already materialized model in place (tests, CPU)."""
    quant = _quant(quant_type, double_quant, compute_dtype, skip_modules)
    if quant is None:
        return 0
    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or _skipped(name, quant):
            continue
        w = module.weight.detach()
        b = module.bias.detach() if module.bias is not None else None
        set_submodule(model, name, _linear4bit(module, w, b, quant, w.device))
        n += 1
    return n
