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


# Dense (no sparsity) bf16/fp16 tensor-core peak of each GPU, TFLOP/s, from the vendors' datasheets:
# the denominator of MFU. Matched as a substring of torch's device name, first match wins, so the
# more specific names come first ("H100 PCIe" before "H100", "L40S" before "L4").
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 125.0),
)


def peak_flops(precision: str) -> float | None:
    """This GPU's dense peak FLOP/s for bf16/fp16 training; None on CPU, in fp32 (TF32 peaks are
    another story) or for a GPU missing from PEAK_TFLOPS: no MFU is better than a made-up one."""
    if precision not in ("bf16", "fp16") or not has_cuda():
        return None
    import torch

    name = torch.cuda.get_device_name().lower()
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key.lower() in name), None)


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
