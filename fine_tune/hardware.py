"""What the machine can do: device, precision and memory. One place, so every module asks the same."""

from __future__ import annotations

import os
import resource
import sys


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str | None):
    """`auto` means bf16 where the GPU supports it, else fp32 (CPU training is fastest and exact in fp32)."""
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if bf16_supported() else torch.float32
    try:
        return {
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
            "float32": torch.float32,
            "fp32": torch.float32,
        }[str(name)]
    except KeyError:
        from fine_tune.errors import UserError

        raise UserError(f"unknown dtype '{name}'", hint="use auto, bfloat16, float16 or float32") from None


def resolve_precision(name: str) -> str:
    """Training precision: `auto` -> bf16 on capable GPUs, fp16 on older GPUs, fp32 on CPU."""
    if name != "auto":
        return name
    if bf16_supported():
        return "bf16"
    return "fp16" if has_cuda() else "fp32"


def local_device() -> str:
    """This process's device: its own GPU under torchrun/accelerate (LOCAL_RANK), else the CPU."""
    if has_cuda():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def rank() -> int:
    """Global rank under torchrun / accelerate / SLURM (srun tasks); 0 when not distributed."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def is_main_process() -> bool:
    return rank() == 0


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch; on CPU the process's peak resident memory."""
    if "torch" in sys.modules and has_cuda():
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / 2**20
