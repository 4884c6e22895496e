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
    name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(str(name), str(name))
    if name not in ("bfloat16", "float16", "float32"):
        from fine_tune.errors import UserError

        raise UserError(f"unknown dtype '{name}'", hint="use auto, bfloat16, float16 or float32")
    return getattr(torch, name)


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


# How each launcher tells a process where it stands: (global rank, rank on its node, processes in the
# job). torchrun and `accelerate launch` first; then SLURM's srun tasks (SLURM_STEP_NUM_TASKS counts
# the tasks of this step: an sbatch script run with --ntasks=4 but no srun is still one process);
# then a launcher that announces only the local rank.
LAUNCHER_VARIABLES = (
    ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS"),
    ("LOCAL_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
)


def _from_launcher(position: int) -> int | None:
    """The value at `position` of the first launcher whose rank variable is set."""
    for names in LAUNCHER_VARIABLES:
        if os.environ.get(names[0], "").isdigit():
            value = os.environ.get(names[position], "")
            return int(value) if value.isdigit() else None
    return None


def launched() -> bool:
    """Started by torchrun, accelerate launch or srun (even as a single process)."""
    return _from_launcher(0) is not None


def rank() -> int:
    """Global rank under torchrun / accelerate / SLURM (srun tasks); 0 when not distributed."""
    return _from_launcher(0) or 0


def local_rank() -> int:
    """This process's rank on its node: which of the node's GPUs it takes."""
    return _from_launcher(1) or 0


def world_size() -> int:
    """Processes in the job as the launcher announced them (1 when not launched by one); without a
    launcher `WORLD_SIZE` still counts, for `WORLD_SIZE=4 python -m fine_tune plan=true`."""
    found = _from_launcher(2)
    if found is None and os.environ.get("WORLD_SIZE", "").isdigit():
        found = int(os.environ["WORLD_SIZE"])
    return max(found or 1, 1)


def local_device() -> str:
    """This process's device: its own GPU under torchrun/accelerate/srun (its local rank), else the CPU."""
    return f"cuda:{local_rank()}" if has_cuda() else "cpu"


def is_main_process() -> bool:
    return rank() == 0


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch; on CPU the process's peak resident memory."""
    if "torch" in sys.modules and has_cuda():
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / 2**20
