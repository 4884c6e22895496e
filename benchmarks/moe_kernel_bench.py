"""Loop vs grouped 4-bit experts on one MoE layer: time, peak memory, host syncs, operator calls.

Why a script: the speed of `quant.expert_kernel` is a GPU question (docs/speed.md, "MoE"); tests
only check that the kernels compute the same thing. One layer's experts as `Experts4bit` (nf4 +
double quant, random weights) with LoRA on gate_up and down, fed a routed batch; each kernel runs a
forward without gradients (what checkpointing's first pass does), then forward + backward (the
recompute and the backward), several times; the script prints the median times, the peak memory
above the layer's weights and inputs, how often the host waited for the device, the operator calls
per pass, and how far the kernels' outputs and gradients are apart.

  python benchmarks/moe_kernel_bench.py                       # Mixtral-8x7B layer, 4 x 2048 tokens
  python benchmarks/moe_kernel_bench.py --routing skewed --json moe_layer.json
  python benchmarks/moe_kernel_bench.py --tiny                # CPU smoke: tiny shapes, fp32
  python benchmarks/moe_kernel_bench.py --preset mid --device cpu --dtype float32  # docs/speed.md

The whole model, same kernels: `python benchmarks/memory_bench.py --model mixtral --expert-kernel
grouped --configs 4:ckpt:paged8` (then `loop`), or through the CLI: `bash benchmarks/e2e_cli.sh` with
`quant.expert_kernel=grouped|loop` appended to its command line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    # experts, hidden, intermediate per expert, tokens, top-k
    "mixtral": (8, 4096, 14336, 4 * 2048, 2),
    "mid": (8, 1024, 3584, 512, 2),
    "tiny": (4, 64, 128, 256, 2),
}
SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense")  # a host read of a device value


def build_layer(args: argparse.Namespace, device: str, dtype):
    """One experts layer in 4 bits, with LoRA whose B is not zero (so the adapters count)."""
    import torch

    from fine_tune.models.moe import Experts4bit
    from fine_tune.models.moe.lora import ExpertLoRA

    gen = torch.Generator(device=device).manual_seed(0)
    shapes = {
        "gate_up_proj": (2 * args.intermediate, args.hidden),
        "down_proj": (args.hidden, args.intermediate),
    }
    layer = Experts4bit(
        num_experts=args.experts,
        shapes=shapes,
        act_fn=torch.nn.functional.silu,
        compute_dtype=dtype,
        device=device,
    )
    for name, (out_f, in_f) in shapes.items():
        for e in range(args.experts):
            weight = torch.empty(out_f, in_f, device=device, dtype=dtype).normal_(0, 0.02, generator=gen)
            layer.set_expert(name, e, weight)
        adapter = ExpertLoRA(args.experts, in_f, out_f, args.r, 2 * args.r, device=device)
        with torch.no_grad():
            adapter.B.normal_(0, 0.01, generator=gen)
        layer.adapters[name] = adapter
    return layer


def routed_batch(args: argparse.Namespace, device: str, dtype):
    """Hidden states and the router's top-k choice: `uniform` spreads tokens evenly over experts,
    `skewed` sends most of them to a few (as a randomly initialized router does on real text)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.float32, generator=gen)
    logits = torch.randn(args.tokens, args.experts, device=device, generator=gen)
    if args.routing == "skewed":
        logits = logits + torch.linspace(3.0, -3.0, args.experts, device=device)
    weights, index = torch.topk(torch.softmax(logits, dim=-1), args.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return x.to(dtype), index, weights


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def one_pass(layer, x, index, weights, backward: bool):
    import torch

    if not backward:
        with torch.no_grad():
            return layer(x, index, weights), None
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = layer(x, index, weights)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return out.detach(), grads


# ops that launch no device kernel (views, metadata); everything else counts as one launch
NO_KERNEL = {
    "aten::view",
    "aten::_unsafe_view",
    "aten::reshape",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::as_strided",
    "aten::select",
    "aten::slice",
    "aten::expand",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::unbind",
    "aten::split",
    "aten::chunk",
    "aten::narrow",
    "aten::detach",
    "aten::alias",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::lift_fresh",
    "aten::result_type",
    "aten::is_nonzero",
    "aten::contiguous",
    "aten::to",
}


def _one_kernel(name: str) -> bool:
    """Ops counted as one launch whatever they call inside (bitsandbytes' dequantization kernels,
    the grouped GEMM)."""
    return name == "aten::_grouped_mm" or name.startswith("bitsandbytes::")


def _inside_one_kernel(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _one_kernel(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def host_reads(layer, x, index, weights, backward: bool, device: str) -> tuple[int, int]:
    """(host reads of device values, kernel-launching operator calls) of one pass.

    Counted on the host by the profiler: leaf aten ops that launch a kernel (views excluded) and
    bitsandbytes' dequantizations, and
    `nonzero` / `_local_scalar_dense` (`.item()`, `.tolist()`), each a device sync on CUDA. What
    `torch._grouped_mm` does inside is not counted: on CUDA (bf16, sm90/sm100) it is one kernel and
    no sync; its CPU implementation loops over the groups. On CUDA the syncs are also counted by
    torch's sync debug mode, which replaces the profiler's figure.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_pass(layer, x, index, weights, backward)
    reads = launches = 0
    for event in prof.events():
        if not event.name.startswith(("aten::", "bitsandbytes::")) or _inside_one_kernel(event):
            continue
        if event.name in SYNC_OPS:
            reads += 1
        leaf = _one_kernel(event.name) or not any(c.name.startswith("aten::") for c in event.cpu_children)
        launches += leaf and event.name not in NO_KERNEL
    if device == "cuda":
        sync(device)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                one_pass(layer, x, index, weights, backward)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        sync(device)
        reads = sum("synchroniz" in str(w.message) for w in caught)
    return reads, launches


def measure(layer, kernel: str, batch, args: argparse.Namespace, device: str) -> dict:
    import torch

    from fine_tune.models.moe.experts4bit import set_expert_kernel

    set_expert_kernel(layer, kernel)
    x, index, weights = batch
    row = {"kernel": kernel}
    for backward in (False, True):
        label = "fwd_bwd" if backward else "fwd_nograd"
        one_pass(layer, x, index, weights, backward)  # warm-up (kernel selection, allocator)
        if device == "cuda":
            torch.cuda.empty_cache()
            stats = torch.cuda.memory_stats()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(args.reps):
            sync(device)
            t0 = time.perf_counter()
            one_pass(layer, x, index, weights, backward)
            sync(device)
            times.append(time.perf_counter() - t0)
        row[f"{label}_ms"] = 1e3 * statistics.median(times)
        if device == "cuda":
            after = torch.cuda.memory_stats()
            row[f"{label}_peak_above_inputs_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            for key in ("num_alloc_retries", "num_device_alloc", "num_device_free"):
                row[f"{label}_{key}"] = after.get(key, 0) - stats.get(key, 0)
        row[f"{label}_host_syncs"], row[f"{label}_kernel_calls"] = host_reads(
            layer, x, index, weights, backward, device
        )
    return row


def compare(layer, batch, kernels: list[str]) -> dict:
    """Largest differences of the output and every gradient between the first kernel and the rest,
    relative to the first kernel's largest magnitude."""
    from fine_tune.models.moe.experts4bit import set_expert_kernel

    results = {}
    for kernel in kernels:
        set_expert_kernel(layer, kernel)
        out, grads = one_pass(layer, *batch, backward=True)
        results[kernel] = [out, *grads]
    ref = results[kernels[0]]
    diffs = {}
    for kernel in kernels[1:]:
        worst = 0.0
        for a, b in zip(ref, results[kernel], strict=True):
            scale = float(a.float().abs().max()) or 1.0
            worst = max(worst, float((a.float() - b.float()).abs().max()) / scale)
        diffs[f"{kernels[0]}_vs_{kernel}_max_rel_diff"] = worst
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mixtral")
    ap.add_argument("--tiny", action="store_true", help="--preset tiny --device cpu --dtype float32")
    ap.add_argument("--experts", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--routing", choices=["uniform", "skewed"], default="uniform")
    ap.add_argument("--kernels", default="loop,grouped")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (the GPU path is bf16)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.device, args.dtype = "tiny", "cpu", "float32"
    defaults = dict(
        zip(("experts", "hidden", "intermediate", "tokens", "top_k"), PRESETS[args.preset], strict=True)
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    kernels = [k for k in args.kernels.split(",") if k]
    layer = build_layer(args, device, dtype)
    batch = routed_batch(args, device, dtype)
    loads = torch.bincount(batch[1].reshape(-1), minlength=args.experts).tolist()
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(
        f"{args.preset}: {args.experts} experts, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.tokens} tokens top-{args.top_k} ({args.routing}: rows per expert {loads}), LoRA r={args.r}, "
        f"{args.dtype} on {name}",
        flush=True,
    )
    rows = [measure(layer, kernel, batch, args, device) for kernel in kernels]
    diffs = compare(layer, batch, kernels) if len(kernels) > 1 else {}
    keys = [k for k in rows[0] if k != "kernel"]
    print(f"{'':34}" + "".join(f"{r['kernel']:>12}" for r in rows))
    for key in keys:
        print(
            f"{key:34}"
            + "".join(f"{r[key]:>12.4g}" if isinstance(r[key], float) else f"{r[key]:>12}" for r in rows)
        )
    for key, value in diffs.items():
        print(f"{key}: {value:.3g}")
    if args.json:
        doc = {"args": vars(args), "device": name, "torch": torch.__version__, "rows": rows, "diffs": diffs}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
