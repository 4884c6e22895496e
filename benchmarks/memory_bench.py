"""Peak GPU memory and throughput of QLoRA training on real-shape random models, next to the plan.

Why a script and not a test: it needs a big GPU and minutes; its output is the evidence behind
docs/memory.md. The model is built layer by layer with random weights (fine_tune.models.moe.
build_random_model), so Mixtral-8x7B needs neither a checkpoint nor its bf16 size anywhere. The
training step mirrors the core's path: PEFT's prepare_model_for_kbit_training (which upcasts the
non-quantized weights to fp32), get_peft_model, our expert LoRA, bf16 autocast, loss from the
model, clip, optimizer step.

  python benchmarks/memory_bench.py --model mixtral --configs 4:ckpt:paged8,8:ckpt:paged8 \
      --max-batch ckpt:paged8 --json out.json

Each config is `batch:ckpt|nockpt:paged8|adamw8|adamw32|paged32`. `--expert-kernel grouped|loop`
picks how the 4-bit experts compute (`quant.expert_kernel`; default auto: grouped on an H100).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    # transformers' config defaults are Mistral-7B / Mixtral-8x7B / Qwen1.5-MoE-A2.7B
    "mistral": {"family": "mistral", "lora": "all"},
    "mixtral": {"family": "mixtral", "lora": "attn_experts"},
    "qwen2_moe": {"family": "qwen2_moe", "lora": "attn_experts"},  # planned with Mixtral's coefficients
}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
OPTIMS = {
    "paged8": "bitsandbytes.optim.PagedAdamW8bit",
    "adamw8": "bitsandbytes.optim.AdamW8bit",
    "paged32": "bitsandbytes.optim.PagedAdamW32bit",
    "adamw32": "torch.optim.AdamW",
}


def parse_config(text: str) -> dict:
    batch, ckpt, optim = text.split(":")
    if ckpt not in ("ckpt", "nockpt") or optim not in OPTIMS:
        raise SystemExit(f"bad config {text!r}: batch:ckpt|nockpt:{'|'.join(OPTIMS)}")
    return {"batch": int(batch), "ckpt": ckpt == "ckpt", "optim": optim}


def cfg_for(args: argparse.Namespace, batch: int, ckpt: bool, optim: str) -> dict:
    """The composed-config shape the planner reads (plain dicts: no omegaconf needed here)."""
    lora = MODELS[args.model]["lora"] if args.targets is None else args.targets
    return {
        "model": {
            "family": MODELS[args.model]["family"],
            "name_or_path": None,
            "init": "random",
            "architecture": {},
            "config": {"num_hidden_layers": args.layers} if args.layers else {},
            "dtype": "bfloat16",
        },
        "quant": {
            "kind": args.quant,
            "double_quant": not args.no_double_quant,
            "compute_dtype": "bfloat16",
            "quant_experts": True,
            "expert_kernel": args.expert_kernel,
        },
        "lora": {
            "r": args.r,
            "lora_alpha": 2 * args.r,
            "lora_dropout": args.dropout
            if args.dropout is not None
            else (0.0 if lora == "attn_experts" else 0.05),
            "target_modules": ATTN if lora in ("attn", "attn_experts") else ATTN + MLP,
            "experts": lora in ("attn_experts", "all") and args.model != "mistral",
            # the bench gives expert adapters the same dropout (the core gives them none)
            "expert_dropout": args.dropout or 0.0,
        },
        "trainer": {
            "per_device_train_batch_size": batch,
            "gradient_checkpointing": ckpt,
            "precision": "bf16",
        },
        "dataset": {"max_length": args.seq},
        "optim": {"optimizer": {"_target_": OPTIMS[optim]}},
    }


def make_optimizer(name: str, params: list, lr: float = 1e-4):
    import torch

    if name == "adamw32":
        return torch.optim.AdamW(params, lr=lr)
    import bitsandbytes as bnb

    return {
        "paged8": bnb.optim.PagedAdamW8bit,
        "adamw8": bnb.optim.AdamW8bit,
        "paged32": bnb.optim.PagedAdamW32bit,
    }[name](params, lr=lr)


def build(args: argparse.Namespace):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from fine_tune.families import get_family
    from fine_tune.models.moe import attach_expert_lora, build_random_model
    from fine_tune.models.moe.experts4bit import format_counts, set_expert_kernel

    cfg = cfg_for(args, 1, True, "paged8")
    config = get_family(MODELS[args.model]["family"]).config()
    if args.layers:
        config.num_hidden_layers = args.layers
    config.use_cache = False
    t0 = time.perf_counter()
    model = build_random_model(
        config,
        quant_type=None if args.quant == "none" else args.quant,
        double_quant=not args.no_double_quant,
        compute_dtype=torch.bfloat16,
        device="cuda",
        dtype=torch.bfloat16,
    )
    set_expert_kernel(model, args.expert_kernel)
    torch.cuda.synchronize()
    built_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated()
    print(
        f"built in {built_s:.1f}s: {format_counts(model.fine_tune_param_counts)}; "
        f"allocated {weights / 2**30:.2f} GiB",
        flush=True,
    )
    if not args.no_kbit_prep and args.quant != "none":  # the core preps quantized models only
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    lcfg = cfg["lora"]
    model = get_peft_model(
        model,
        LoraConfig(
            r=lcfg["r"],
            lora_alpha=lcfg["lora_alpha"],
            lora_dropout=lcfg["lora_dropout"],
            target_modules=lcfg["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    if lcfg["experts"]:
        attach_expert_lora(
            model, r=lcfg["r"], lora_alpha=lcfg["lora_alpha"], lora_dropout=lcfg["expert_dropout"]
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = torch.cuda.memory_allocated()
    print(f"trainable {trainable / 1e6:.1f}M params; static allocated {static / 2**30:.2f} GiB", flush=True)
    return model, {
        "build_s": built_s,
        "weights_bytes": weights,
        "static_bytes": static,
        "trainable": trainable,
        "counts": model.base_model.model.fine_tune_param_counts,
    }


def set_checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()
    model.train()


def measure(model, args: argparse.Namespace, batch: int, ckpt: bool, optim_name: str, steps: int) -> dict:
    """Peak allocated over `steps` full training steps, and tokens/s after the first step.

    Peaks are also kept per phase (forward incl. loss / backward / clip + optimizer step) to see
    which phase sets the peak; the overall peak is the max of all, optimizer states included.
    """
    import torch

    set_checkpointing(model, ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    optimizer = None
    result = {"batch": batch, "ckpt": ckpt, "optim": optim_name, "seq": args.seq, "base_bytes": base}
    phase = {"forward": 0, "backward": 0, "step": 0}
    try:
        optimizer = make_optimizer(optim_name, params)
        gen = torch.Generator(device="cuda").manual_seed(0)
        times, losses = [], []
        for _ in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (batch, args.seq), device="cuda", generator=gen)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            phase["forward"] = max(phase["forward"], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            loss.backward()
            phase["backward"] = max(phase["backward"], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            torch.nn.utils.clip_grad_norm_(params, 0.3)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            phase["step"] = max(phase["step"], torch.cuda.max_memory_allocated())
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            del loss, ids
        step_s = sum(times[1:]) / max(len(times) - 1, 1)
        result.update(
            status="ok",
            peak_bytes=max(phase.values()),
            phase_peak_bytes=phase,
            reserved_bytes=torch.cuda.max_memory_reserved(),
            step_s=step_s,
            tokens_per_s=batch * args.seq / step_s,
            losses=losses,
        )
    except torch.OutOfMemoryError:
        result.update(status="oom", peak_bytes=max(torch.cuda.max_memory_allocated(), *phase.values()))
    finally:
        for p in params:
            p.grad = None
        del optimizer
        gc.collect()
        torch.cuda.empty_cache()
    return result


def predicted(args: argparse.Namespace, batch: int, ckpt: bool, optim: str, gpu_gib: float):
    try:
        from fine_tune.plan import plan_memory
    except ImportError:
        return None, None
    plan = plan_memory(cfg_for(args, batch, ckpt, optim))
    return plan, plan.max_batch_size(gpu_gib)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--layers", type=int, default=None, help="cut the model to N layers (default: all)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"])
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--targets", choices=["attn", "attn_experts", "all"], default=None)
    ap.add_argument("--dropout", type=float, default=None)
    ap.add_argument("--expert-kernel", choices=["auto", "grouped", "loop"], default="auto")
    ap.add_argument(
        "--no-kbit-prep", action="store_true", help="skip PEFT's fp32 upcast of non-4-bit weights"
    )
    ap.add_argument("--configs", default="4:ckpt:paged8", help="comma list of batch:ckpt|nockpt:optim")
    ap.add_argument("--max-batch", default=None, help="ckpt:optim: find the largest batch that trains")
    ap.add_argument("--max-batch-limit", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--search-steps", type=int, default=2, help="steps per try of the max-batch search")
    ap.add_argument("--gpu-gib", type=float, default=None, help="GPU size for the plan (default: detected)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    gpu_gib = args.gpu_gib or total_gib
    model, info = build(args)
    rows = []
    max_batch = None

    def dump() -> None:
        if args.json:  # after every row: a run cut by a time limit still leaves its numbers
            doc = {
                "args": vars(args),
                "info": info,
                "rows": rows,
                "max_batch": max_batch,
                "gpu": torch.cuda.get_device_name(0),
                "gpu_total_gib": total_gib,
            }
            Path(args.json).write_text(json.dumps(doc, indent=1, default=str))

    def run(batch: int, ckpt: bool, optim: str, steps: int | None = None) -> dict:
        r = measure(model, args, batch, ckpt, optim, steps or args.steps)
        plan, _ = predicted(args, batch, ckpt, optim, gpu_gib)
        if plan is not None:
            r["predicted_bytes"] = plan.total_bytes
            r["plan"] = plan.to_dict()
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "plan"}), flush=True)
        dump()
        return r

    for text in [c for c in args.configs.split(",") if c]:
        c = parse_config(text)
        run(c["batch"], c["ckpt"], c["optim"])

    if args.max_batch:
        ckpt_s, optim = args.max_batch.split(":")
        ckpt = ckpt_s == "ckpt"
        _, guess = predicted(args, 1, ckpt, optim, gpu_gib)
        tried = {r["batch"]: r["status"] == "ok" for r in rows if r["ckpt"] == ckpt and r["optim"] == optim}

        def ok_at(b: int) -> bool:
            if b not in tried:
                tried[b] = run(b, ckpt, optim, args.search_steps)["status"] == "ok"
            return tried[b]

        # start at the planner's answer and walk out in growing steps until the outcome flips,
        # then bisect: few tries when the plan is good, still correct when it is not
        b = max(guess or 1, 1)
        step = 1
        if ok_at(b):
            lo, hi = b, None
            while hi is None and lo + step <= args.max_batch_limit:
                if ok_at(lo + step):
                    lo += step
                    step *= 2
                else:
                    hi = lo + step
        else:
            lo, hi = 0, b
            while lo == 0 and hi - step >= 1:
                if ok_at(hi - step):
                    lo = hi - step
                else:
                    hi -= step
                    step *= 2
        while hi is not None and hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok_at(mid) else (lo, mid)
        max_batch = lo
        dump()
        print(f"largest batch that trains ({args.max_batch}, seq {args.seq}): {max_batch}", flush=True)

    print()
    print(
        f"{args.model} layers={args.layers or 'all'} seq={args.seq} quant={args.quant} r={args.r} "
        f"GPU {torch.cuda.get_device_name(0)} ({total_gib:.1f} GiB)"
    )
    print(
        f"{'batch':>5} {'ckpt':>5} {'optim':>8} {'predicted GiB':>13} {'measured GiB':>12} {'error':>7} "
        f"{'tokens/s':>9} {'s/step':>7}"
    )
    for r in rows:
        pred = r.get("predicted_bytes")
        meas = r["peak_bytes"]
        err = f"{(pred - meas) / meas:+.1%}" if pred and r["status"] == "ok" else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r["status"] == "ok" else "OOM"
        sps = f"{r['step_s']:.2f}" if r["status"] == "ok" else "-"
        print(
            f"{r['batch']:>5} {str(r['ckpt']):>5} {r['optim']:>8} "
            f"{(pred or math.nan) / 2**30:>13.2f} {meas / 2**30:>12.2f} {err:>7} {tps:>9} {sps:>7}"
        )
    dump()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
