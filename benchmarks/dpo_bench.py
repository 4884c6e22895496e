"""Preference tuning speed and memory through the real CLI (`python -m fine_tune method=dpo ...`).

    python benchmarks/dpo_bench.py --json $OUT/dpo.json                  # one H100: every system below
    python benchmarks/dpo_bench.py --systems sft_mistral,dpo_mistral     # a subset
    python benchmarks/dpo_bench.py --tiny                                # CPU dry run of the harness

Work (issue 12), random weights of the real shapes (`model.init=random`, the mistral_v1 tokenizer
from mistral-common: nothing is downloaded), nf4 + double quant, bf16, gradient checkpointing
(trainer=gpu), paged AdamW 8-bit, DPO beta 0.1 (sigmoid), synthetic pairs whose every sequence
(prompt + answer) has exactly --prompt-tokens + --answer-tokens tokens:

  sft_mistral        Mistral-7B, LoRA r=16 on all 7 projections: SFT on the pairs' two sequences
                     (prompt + chosen, prompt + rejected as two examples), 2 x --batch rows a step
  dpo_mistral        the same model and sequences as DPO: --batch pairs a step (the same rows), plus
                     the reference forward with the adapter off. Target: >= 0.8x sft_mistral's tokens/s
  dpo_mistral_pre    dpo_mistral with method.precompute_ref_log_probs=true (reference taken up front)
  orpo_mistral       the same as ORPO (no reference)
  dpo_mixtral        Mixtral-8x7B shape, nf4 experts, LoRA on attention + experts (lora=attn_experts),
                     pairs of 1,024 + 1,024 tokens (each sequence 1,024) at batch 2: fits and trains?

Figures: steady tokens/s = non-padding tokens the model was fed (chosen and rejected rows; DPO's
reference forward is not counted again) per second of training after --warmup steps, from the run's
own per-step log (logging_steps=1), as benchmarks/speed.py reads it; peak = metrics.json's
`peak_memory_gib` (torch.cuda.max_memory_allocated over the whole run). Record the table in
docs/benchmarks.md with the GPU and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import steady_from_log  # noqa: E402  the same steady-state reading as the SFT benchmark

SYSTEMS = ("sft_mistral", "dpo_mistral", "dpo_mistral_pre", "orpo_mistral", "dpo_mixtral")
DEFAULT_SYSTEMS = ("sft_mistral", "dpo_mistral", "dpo_mixtral")
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "we",
    "saw",
    "it",
    "run",
    "to",
    "you",
    "by",
    "my",
    "old",
    "red",
    "car",
    "in",
    "one",
    "day",
]


def overrides_of(system: str, args: argparse.Namespace, data: dict[str, Path]) -> list[str]:
    """The CLI overrides of one system (see the module docstring)."""
    mixtral = system.endswith("mixtral")
    model = (
        [f"model={'tiny_mixtral' if mixtral else 'tiny_mistral'}"]
        if args.tiny
        else [
            f"model={'mixtral' if mixtral else 'mistral_7b'}",
            "model.init=random",
            "model.name_or_path=null",
            f"model.tokenizer={args.tokenizer or 'mistral_v1'}",
        ]
    )
    method = system.split("_")[0]
    pairs = method != "sft"
    batch = args.mixtral_batch if mixtral else args.batch
    length = args.prompt_tokens + args.answer_tokens
    common = [
        *model,
        "quant=nf4",
        "lora=attn_experts" if mixtral else "lora=default",
        "trainer=cpu" if args.tiny else "trainer=gpu",
        "optim=adamw_torch" if args.tiny else "optim=paged_adamw_8bit",
        f"trainer.max_steps={args.steps}",
        f"trainer.per_device_train_batch_size={batch if pairs else 2 * batch}",
        "trainer.gradient_accumulation_steps=1",
        "trainer.logging_steps=1",
        "trainer.eval_steps=100000",
        "trainer.save_steps=100000",
        "trainer.generation.num_prompts=0",
        f"dataset.max_length={length}",
        "dataset.val_ratio=0",
        "dataset.template=mistral",
        "logger=none",
    ]
    if not pairs:
        return [*common, "method=sft", "dataset=chat", f"dataset.path={data['sft']}"]
    extra = ["method.precompute_ref_log_probs=true"] if system.endswith("_pre") else []
    return [*common, f"method={method}", *extra, "dataset=preference", f"dataset.path={data['pairs']}"]


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_data(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Pairs whose every sequence is exactly prompt + answer tokens long, and the same sequences as
    SFT examples. The template's own tokens are measured through fine_tune's data pipeline first."""
    from fine_tune.data import build_preference_data
    from fine_tune.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer or "mistral_v1", None)
    for word in WORDS:  # each word (after a space) must be one token for the lengths to add up
        assert len(tokenizer(f" {word}", add_special_tokens=False)["input_ids"]) == 1, word
    rng = random.Random(0)
    probe = work / "probe.jsonl"
    probe.write_text(
        json.dumps({"prompt": words(8, rng), "chosen": words(8, rng), "rejected": words(9, rng)}) + "\n"
    )
    row = build_preference_data(
        format="preference", path=str(probe), tokenizer=tokenizer, val_ratio=0.0, max_length=4096
    ).train[0]
    prompt_extra, answer_extra = len(row["prompt_ids"]) - 8, len(row["chosen_ids"]) - 8
    n_pairs = max(args.batch, args.mixtral_batch) * (args.steps + 2)
    pairs, sft = [], []
    for _ in range(n_pairs):
        prompt = words(args.prompt_tokens - prompt_extra, rng)
        chosen, rejected = (words(args.answer_tokens - answer_extra, rng) for _ in range(2))
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        for answer in (chosen, rejected):
            sft.append(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            )
    paths = {"pairs": work / "pairs.jsonl", "sft": work / "sft.jsonl"}
    for name, rows in (("pairs", pairs), ("sft", sft)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    check = build_preference_data(
        format="preference",
        path=str(paths["pairs"]),
        tokenizer=tokenizer,
        val_ratio=0.0,
        max_length=args.prompt_tokens + args.answer_tokens,
        max_samples=4,
    )
    lengths = {len(r["prompt_ids"]) + len(r[f"{a}_ids"]) for r in check.train for a in ("chosen", "rejected")}
    print(f"sequence lengths (prompt + answer): {sorted(lengths)}", flush=True)
    return paths


def run(system: str, work: Path, args: argparse.Namespace, data: dict[str, Path]) -> dict:
    run_dir = work / system
    overrides = [*overrides_of(system, args, data), f"hydra.run.dir={run_dir}", *args.overrides]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fine_tune", *overrides], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-2000:], "overrides": overrides}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "steady_tokens_per_s": steady_from_log([r for r in rows if "train/loss" in r], args.warmup),
        "peak_gib": metrics.get("peak_memory_gib"),
        "tokens_per_second": metrics.get("tokens_per_second"),
        "mfu": metrics.get("mfu"),
        "reward_accuracy": metrics.get("reward_accuracy"),
        "first_loss": metrics.get("first_train_loss"),
        "last_loss": metrics.get("train_loss"),
        "wall_s": time.perf_counter() - started,
        "overrides": overrides,
    }


def print_table(results: dict, device: str) -> None:
    sft = (results.get("sft_mistral") or {}).get("steady_tokens_per_s")
    print(f"\n| system ({device}) | steady tokens/s | vs sft_mistral | peak GiB | MFU | loss first -> last |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | error: {r['error'].strip().splitlines()[-1][:100]} | | | | |")
            continue
        speed, gib, mfu = r["steady_tokens_per_s"], r["peak_gib"], r["mfu"]
        ratio = f"{speed / sft:.2f}x" if speed and sft and "_mistral" in name else "-"
        losses = f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}" if r["first_loss"] is not None else "-"
        print(
            f"| {name} | {speed or 0:,.0f} | {ratio} | {gib or 0:.2f} | "
            f"{f'{mfu * 100:.1f}%' if mfu else '-'} | {losses} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"any of {','.join(SYSTEMS)}")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument(
        "--batch", type=int, default=4, help="pairs per step on Mistral-7B (SFT: twice the rows)"
    )
    parser.add_argument("--mixtral-batch", type=int, default=2, help="pairs per step on Mixtral-8x7B")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="of every sequence, template included")
    parser.add_argument("--answer-tokens", type=int, default=512, help="of every sequence, EOS included")
    parser.add_argument("--work", default="/tmp/dpo_bench")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a saved mistral_v1 tokenizer dir (where mistral-common is not installed)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU: check the harness")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra fine_tune overrides for every run")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.warmup, args.prompt_tokens, args.answer_tokens = 4, 1, 40, 16
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, args)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {}
    for system in args.systems.split(","):
        if system not in SYSTEMS:
            raise SystemExit(f"unknown system {system}; known: {', '.join(SYSTEMS)}")
        results[system] = run(system, work, args, data)
        shown = {k: v for k, v in results[system].items() if k != "overrides"}
        print(f"{system}: {json.dumps(shown)[:600]}", flush=True)
    print_table(results, device)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device, "args": vars(args), "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
