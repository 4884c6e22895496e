"""Where a training step's time goes: torch.profiler over a few steps of any HF/TRL trainer, or of
`python -m fine_tune` itself (not a test; used by speed.py --profile).

    PROFILE_OUT=<dir> python benchmarks/profiling.py <fine_tune overrides>   # PROFILE_START, PROFILE_STEPS
    PROFILE_MEMORY=1 ...                      # instead: what is allocated at the peak of those steps

Writes `<out>/<name>.txt`: wall time of the profiled steps, how much of it the GPU was busy, the
kernels by GPU time grouped by kind (matmul, 4-bit dequantization, attention, elementwise, copies,
...) and the 40 costliest kernels and CPU operators. A GPU busy far less than the wall time means
the step waits on the host (launch overhead, syncs, Python); a busy GPU means the kernels are the cost.
"""

from __future__ import annotations

import os
import re
import runpy
import sys
import time
from collections import defaultdict
from pathlib import Path

KINDS = (  # first match wins: kernel-name patterns -> what the time is spent on
    ("4-bit dequantize", r"dequant|kDequantize|kQuantize"),
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention|cutlassF|cutlassB"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|sm90|sm80|cublas|wgmma|ampere|hopper|splitK|_mm_"),
    ("optimizer", r"optimizer|adam|Adam"),
    ("fused (triton)", r"triton|liger|_kernel$"),
    ("reduction / norm", r"reduce|norm|Norm|softmax|sum_|mean"),
    ("copy / cast", r"copy|Copy|cast|to_|memcpy|Memcpy|memset|Memset|cat|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|Elementwise|pointwise|where|mul|add"),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def summarize(prof, wall_s: float, steps: int) -> str:
    """A readable account of the profiled steps (times per step)."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # not the CPU ops that launched them
    gpu = [(e.key, e.self_device_time_total, e.count) for e in kernels if e.self_device_time_total > 0]
    busy_us = sum(t for _, t, _ in gpu)
    lines = [
        f"profiled steps: {steps}; wall per step {wall_s / steps * 1e3:.1f} ms; "
        f"GPU kernel time per step {busy_us / steps / 1e3:.1f} ms "
        f"({busy_us / 1e6 / wall_s * 100:.0f}% of wall)",
        f"kernels launched per step: {sum(c for *_, c in gpu) / steps:,.0f}",
        "",
        "GPU time by kind (ms per step, share):",
    ]
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, t, count in gpu:
        entry = by_kind[kind_of(name)]
        entry[0] += t
        entry[1] += count
    for kind, (t, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        share = t / busy_us * 100
        lines.append(f"  {kind:20s} {t / steps / 1e3:9.1f} ms {share:5.1f}% {count / steps:8,.0f} launches")
    lines += ["", "top kernels by GPU time (ms per step, launches per step, kind, name):"]
    for name, t, count in sorted(gpu, key=lambda x: -x[1])[:40]:
        lines.append(f"  {t / steps / 1e3:8.2f} {count / steps:7,.0f}  {kind_of(name):16s} {name[:110]}")
    lines += ["", "top CPU operators by self CPU time (ms per step, calls per step):"]
    ops = [e for e in events if e.device_type != DeviceType.CUDA]
    cpu = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:30]
    for e in cpu:
        lines.append(f"  {e.self_cpu_time_total / steps / 1e3:8.2f} {e.count / steps:7,.0f}  {e.key[:110]}")
    return "\n".join(lines)


def profile_callback(out: Path, name: str, start: int = 4, steps: int = 2):
    """A TrainerCallback that profiles steps start+1 .. start+steps and writes `<out>/<name>.txt`."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class ProfileCallback(TrainerCallback):
        def __init__(self) -> None:
            self.prof = None
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == start and self.prof is None:
                sync()
                activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
                self.prof = profile(activities=activities, record_shapes=False)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == start + steps:
                sync()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                out.mkdir(parents=True, exist_ok=True)
                text = summarize(self.prof, wall, steps)
                (out / f"{name}.txt").write_text(text + "\n")
                print(f"PROFILE {name}\n{text}", file=sys.stderr, flush=True)
                self.prof = False  # done; never again in this run

    return ProfileCallback()


WHERE = (
    "fine_tune/",
    "peft/",
    "transformers/",
    "bitsandbytes/",
    "trl/",
    "liger_kernel/",
    "torch/utils/checkpoint",
)


def peak_breakdown(snapshot: dict, before: int) -> str:
    """The tensors alive at the highest point of a recorded memory history, grouped by the first
    frame of ours or a library's that allocated them (allocations from before the recording,
    the weights mostly, count as `before`)."""
    events = [
        e for trace in snapshot["device_traces"] for e in trace if e["action"] in ("alloc", "free_completed")
    ]
    live, now, peak, at = {}, 0, 0, 0
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            now += event["size"]
        elif live.pop(event["addr"], None) is not None:
            now -= event["size"]
        if now > peak:
            peak, at = now, index
    live = {}
    for event in events[: at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        else:
            live.pop(event["addr"], None)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live.values():
        frames = event.get("frames") or []
        frame = next((f for f in frames if any(w in f["filename"] for w in WHERE)), None)
        where = (
            f"{frame['filename'].split('site-packages/')[-1]}:{frame['line']} {frame['name']}"
            if frame
            else "(no Python frame)"
        )
        groups[where][0] += event["size"]
        groups[where][1] += 1
    lines = [
        f"before the recording {before / 2**30:.2f} GiB; recorded peak +{peak / 2**30:.2f} GiB "
        f"= {(before + peak) / 2**30:.2f} GiB; alive at the peak, by where allocated:"
    ]
    for where, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:25]:
        lines.append(f"  {size / 2**20:9.1f} MiB  {count:4d} x  {where}")
    return "\n".join(lines)


def memory_callback(out: Path, name: str, start: int = 4, steps: int = 2):
    """A TrainerCallback that records allocations over steps start+1 .. start+steps and writes
    `<out>/<name>_memory.txt` (peak_breakdown)."""
    import torch
    from transformers import TrainerCallback

    class MemoryCallback(TrainerCallback):
        before = -1

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == start and self.before < 0:
                torch.cuda.synchronize()
                self.before = torch.cuda.memory_allocated()
                torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")

        def on_step_end(self, args, state, control, **kwargs):
            if self.before >= 0 and state.global_step == start + steps:
                torch.cuda.synchronize()
                text = peak_breakdown(torch.cuda.memory._snapshot(), self.before)
                torch.cuda.memory._record_memory_history(enabled=None)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{name}_memory.txt").write_text(text + "\n")
                print(f"MEMORY {name}\n{text}", file=sys.stderr, flush=True)
                self.before = 1 << 62  # done

    return MemoryCallback()


def fine_tune_main() -> None:
    """`python -m fine_tune` with the profiler callback added to the run's trainer."""
    import fine_tune.recipe as recipe

    build = recipe.Recipe.trainer
    out = Path(os.environ["PROFILE_OUT"])
    name = os.environ.get("PROFILE_NAME", "fine_tune")
    start, steps = int(os.environ.get("PROFILE_START", 4)), int(os.environ.get("PROFILE_STEPS", 2))

    def trainer(self, *args, **kwargs):
        built, metrics = build(self, *args, **kwargs)
        watch = memory_callback if os.environ.get("PROFILE_MEMORY") else profile_callback
        built.add_callback(watch(out, name, start, steps))
        return built, metrics

    recipe.Recipe.trainer = trainer
    runpy.run_module("fine_tune", run_name="__main__")  # as `python -m fine_tune` (Hydra finds conf/)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    fine_tune_main()
