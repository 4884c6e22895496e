"""Does an eval change what a 4-bit run trains on this CPU? (not a test: prints figures)

    CUDA_VISIBLE_DEVICES= python benchmarks/cpu_4bit_eval_drift.py [model=tiny_mixtral]

Trains the tiny model in nf4 with the same seed three times: with an evaluation (and generation
samples) every 4 steps, bitsandbytes' CPU inference repacking left on (its default) and turned off
(fine_tune's default, `pin_portable_4bit_layout`), and without any eval. Prints the per-step training
losses and how far they drift apart. On CPUs without AVX512-BF16 the repacking never happens (drift
0); on CPUs with it, the training after the first eval differs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
ROOT = Path(__file__).resolve().parents[1]


def per_step_losses(overrides: list[str], repack: bool) -> list[float]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    import fine_tune.models.moe.build as moe_build
    import fine_tune.models.quant as quant
    from fine_tune.run import train

    pin = quant.pin_portable_4bit_layout
    keep = (lambda model: model) if repack else pin
    quant.pin_portable_4bit_layout = moe_build.pin_portable_4bit_layout = keep
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp)
            train(cfg, run_dir, instantiate(cfg.logger), job={"overrides": overrides})
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        quant.pin_portable_4bit_layout = moe_build.pin_portable_4bit_layout = pin
    return [row["train/loss"] for row in rows if "train/loss" in row]


def main() -> None:
    import bitsandbytes.functional as bnbf

    model = next((a for a in sys.argv[1:] if a.startswith("model=")), "model=tiny_mixtral")
    base = [
        model,
        "quant=nf4",
        "logger=none",
        "trainer=cpu",
        "trainer.max_steps=12",
        "trainer.logging_steps=1",
        "trainer.save_steps=1000",
        "dataset.max_samples=96",
        "dataset.max_eval_samples=8",
        "optim.scheduler=constant",
    ]
    print(f"bitsandbytes sees AVX512-BF16: {bool(bnbf.has_avx512bf16())}")
    runs = {
        "eval every 4 steps, repacking on (bitsandbytes default)": ([*base, "trainer.eval_steps=4"], True),
        "eval every 4 steps, repacking off (fine_tune)": ([*base, "trainer.eval_steps=4"], False),
        "no eval, repacking off": ([*base, "trainer.eval_steps=1000"], False),
    }
    losses = {label: per_step_losses(overrides, repack) for label, (overrides, repack) in runs.items()}
    for label, values in losses.items():
        print(f"{label:58s} " + " ".join(f"{x:.4f}" for x in values))
    on, off, no_eval = losses.values()
    print(f"max |drift| repacking on vs off (the CPU effect): {max_drift(on, off):.6f}")
    print(f"max |drift| eval vs no eval, repacking off: {max_drift(off, no_eval):.6f}")


def max_drift(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


if __name__ == "__main__":
    main()
