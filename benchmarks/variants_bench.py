"""Tokens/s, peak memory and initialisation time of each LoRA variant against plain LoRA, in ONE run.

    python benchmarks/variants_bench.py --json $OUT/variants.json               # Mistral-7B, one GPU
    python benchmarks/variants_bench.py --variants lora,dora,loftq --json a.json  # a subset (appends)
    python benchmarks/variants_bench.py --tiny                                    # CPU dry run of the harness

Work (issue 15): Mistral-7B shapes with random weights (`model=mistral_7b model.init=random`, built
layer by layer on the GPU), LoRA r=16 / alpha 32 on all seven projections (conf/lora/default.yaml),
random tokens, batch 4 x 2048, gradient checkpointing, paged AdamW 8-bit, bf16 autocast: the step of
benchmarks/memory_bench.py. Each variant is composed from its real options (`lora=dora`,
`optim.loraplus_lr_ratio=16`...) and built through fine_tune's own `build_lora_config`,
`attach_adapter` and optimizer factory, on a freshly built model (PiSSA and OLoRA rewrite the base):

  lora, dora, dora_dropout, loftq, rslora, loraplus      quant=nf4 (QLoRA)
  lora_bf16, dora_bf16, pissa, pissa_niter_4, olora       quant=none (bf16 base; PiSSA/OLoRA need it)

Reported per variant: `init_s` (building the adapter: PEFT's SVD / QR for PiSSA / OLoRA, the LoftQ
SVDs), steady tokens/s (the steps after `--warmup`), peak allocated memory during training and during
initialisation, trainable parameters, and the planner's prediction (`plan_gib`, which for DoRA uses
derived, unmeasured coefficients: this benchmark is what checks them). LoftQ on random weights: the
"full-precision" weight is the 4-bit one plus Gaussian noise of the nf4 error's size, so the SVDs
cost what they cost on a checkpoint (a random model has no checkpoint to read).

On one H100 the whole list takes longer than one 10-minute command may (PiSSA's and LoftQ's full SVDs
of 224 matrices dominate): split it with --variants; results are appended to --json after every
variant, so a run cut by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: the options that make it, on top of COMMON (each is what a user would type)
VARIANTS = {
    "lora": ["quant=nf4"],
    "dora": ["quant=nf4", "lora=dora"],
    "dora_dropout": ["quant=nf4", "lora=dora", "lora.lora_dropout=0.05"],
    "loftq": ["quant=nf4", "lora=loftq"],
    "rslora": ["quant=nf4", "lora=rslora"],
    "loraplus": ["quant=nf4", "optim.loraplus_lr_ratio=16"],  # as optim=loraplus, on the chosen optimizer
    "lora_bf16": ["quant=none"],
    "dora_bf16": ["quant=none", "lora=dora"],
    "pissa": ["quant=none", "lora=pissa"],
    "pissa_niter_4": ["quant=none", "lora=pissa", "lora.init_lora_weights=pissa_niter_4"],
    "olora": ["quant=none", "lora=olora"],
}
COMMON = ["model=mistral_7b", "model.init=random", "trainer.gradient_checkpointing=true", "logger=none"]
TINY = [
    "model=tiny_mistral",
    "trainer=cpu",
    "model.init=random",
    "trainer.gradient_checkpointing=true",
    "logger=none",
    "optim=adamw_torch",
]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fine_tune.schema import check_types

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    check_types(cfg)
    return cfg


def synthetic_full_precision(model):
    """LoftQ's weight source on a random model: the 4-bit weight + noise of the nf4 error's size."""
    import torch
    from peft.utils.integrations import dequantize_module_weight

    def weight(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        module = model.get_submodule("base_model.model." + key.removesuffix(".weight")).get_base_layer()
        quantized = dequantize_module_weight(module).float()
        return quantized + 0.05 * quantized.std() * torch.randn_like(quantized)

    return weight


def build(cfg, device: str):
    """A fresh random model of `cfg`, quantized as `cfg.quant` says, layer by layer on `device`."""
    import torch

    from fine_tune.models.architecture import load_architecture
    from fine_tune.models.moe import build_random_model
    from fine_tune.models.quant import build_quant_config

    m = cfg.model
    config = load_architecture(m.family, m.name_or_path, m.init, m.architecture, m.config)
    config.use_cache = False
    quant = build_quant_config(**{k: v for k, v in cfg.quant.items() if k != "_target_"})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    quantized = {"quant": quant} if quant.enabled else {"quant_type": None}
    return build_random_model(config, **quantized, dtype=dtype, device=device, seed=cfg.seed)


def measure(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    import torch

    from fine_tune.adapters import attach_adapter
    from fine_tune.loftq import loftq_initialise
    from fine_tune.plan import plan_memory
    from fine_tune.training.optim import build_optimizer_factory
    from fine_tune.utils.build import build as build_node

    cuda = not args.tiny
    device = "cuda" if cuda else "cpu"
    cfg = compose([*(TINY if args.tiny else COMMON), *overrides, *args.extra])
    cfg.trainer.per_device_train_batch_size, cfg.dataset.max_length = args.batch, args.seq
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build(cfg, device)
    spec = build_node(cfg.lora)
    started = time.perf_counter()
    model = attach_adapter(model, dataclasses.replace(spec, loftq=False), True)
    if spec.loftq:
        loftq_initialise(model, synthetic_full_precision(model))
    if cuda:
        torch.cuda.synchronize()
    init_s = time.perf_counter() - started
    init_peak = torch.cuda.max_memory_allocated() if cuda else None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer_factory(cfg.optim.optimizer, cfg.optim.loraplus_lr_ratio)(named)
    model.train()
    generator = torch.Generator(device=device).manual_seed(0)
    times, losses = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(
            0, model.config.vocab_size, (args.batch, args.seq), device=device, generator=generator
        )
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    timed = times[args.warmup :]
    plan = plan_memory(cfg)
    result = {
        "variant": name,
        "overrides": overrides,
        "init_s": round(init_s, 3),
        "tokens_per_s": round(args.batch * args.seq * len(timed) / sum(timed), 1),
        "step_s": round(sum(timed) / len(timed), 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "init_peak_gib": round(init_peak / 2**30, 3) if cuda else None,
        "plan_gib": round(plan.total_bytes / 2**30, 3),
        "trainable": sum(p.numel() for _, p in named),
        "plan_trainable": plan.trainable_params,
        "losses": [round(x, 4) for x in losses],
    }
    del model, optimizer, named, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def print_table(rows: list[dict]) -> None:
    base = {r["variant"]: r for r in rows}
    heads = ("init s", "tok/s", "vs lora", "peak GiB", "plan GiB")
    print(f"\n{'variant':<15}" + "".join(f"{h:>10}" for h in heads) + f"{'trainable':>12}")
    for r in rows:
        ref = base.get("lora_bf16" if r["overrides"][0] == "quant=none" else "lora")
        rel = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(
            f"{r['variant']:<15}{r['init_s']:>10.2f}{r['tokens_per_s']:>10.0f}{rel:>10}{peak:>10}"
            f"{r['plan_gib']:>10.2f}{r['trainable']:>12,}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--tiny", action="store_true", help="tiny Mistral on CPU: checks the harness, no figures")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (tiny: 2)")
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (tiny: 64)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; tiny: 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None, help="append each variant's result to this file")
    ap.add_argument("extra", nargs="*", help="more fine_tune overrides for every variant, e.g. lora.r=64")
    args = ap.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (64 if args.tiny else 2048)
    args.steps = args.steps or (2 if args.tiny else 5)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: pick from {list(VARIANTS)}")
    if not args.tiny:
        extra = [
            o for o in ("optim=paged_adamw_8bit",) if not any(e.startswith("optim=") for e in args.extra)
        ]
        args.extra = [*extra, *args.extra]

    import torch

    out = Path(args.json) if args.json else None
    doc = json.loads(out.read_text()) if out and out.exists() else {"rows": []}
    doc["device"] = torch.cuda.get_device_name(0) if not args.tiny else "cpu"
    doc["versions"] = {
        m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")
    }
    rows = []
    for name in names:
        row = measure(name, VARIANTS[name], args)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if out:
            doc["rows"] = [r for r in doc["rows"] if r["variant"] != name] + [row]
            out.write_text(json.dumps(doc, indent=1))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
