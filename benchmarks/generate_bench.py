"""New tokens per second of the samples and `fine_tune.generate` path, per KV-cache strategy.

    python benchmarks/generate_bench.py model=mistral_7b model.init=random model.tokenizer=<dir> quant=nf4
    python benchmarks/generate_bench.py --caches dynamic,static --prompts 4 --new-tokens 32 <overrides>
    python benchmarks/generate_bench.py model=tiny_mistral quant=none              # CPU dry run

The model is what a run samples from: the base built through the run's `model` and `quant` nodes,
with a freshly attached adapter (its B matrices are zero, so the adapter's cost is paid but the
text is the base's). Prompts are fixed questions rendered with the run's template, answered greedily
in one batch by `fine_tune.generation`, as at every evaluation. Each decode strategy
(`fine_tune.generation.DECODE`) answers them `--repeats` times; the first call is reported apart (a
compiled strategy compiles there), the figure is the median of the others: new tokens per second per
sequence (max_new_tokens / seconds; every row generates to the end on random weights).

Is it still greedy decoding of this model? Random weights give near-flat logits, where bf16 noise
flips the argmax, so two correct strategies part ways early and comparing their texts proves little.
Instead each answer is checked against one plain forward (no cache) of prompt + answer: for every
generated token, `greedy_gap` = the largest logit minus the chosen token's logit there (0 when the
forward agrees; bf16 noise gives a few hundredths; a wrong cache or mask gives whole units).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a short scene in which a lighthouse keeper greets an unexpected visitor.",
    "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes. How much did she earn?",
    "Explain, as a pirate would, why the sea is salty.",
    "Betty saves for a $100 wallet and has half of the money. How much more does she need?",
    "Describe the taste of a lemon to someone who has never had one.",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "Give three tips for a first day at a new job.",
)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fine_tune.schema import check_types

    conf = ROOT / "fine_tune" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3", job_name="generate_bench"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    check_types(cfg)
    return cfg


def greedy_gaps(model, prompts: list[list[int]], rows: list[list[int]], eos: int) -> list[float]:
    """Per generated token: max logit - chosen token's logit in a plain forward of prompt + answer."""
    import torch

    device = next(model.parameters()).device
    gaps = []
    with torch.no_grad():
        for prompt, answer in zip(prompts, rows, strict=True):
            answer = answer[: answer.index(eos) + 1] if eos in answer else answer
            ids = torch.tensor([list(prompt) + answer], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
            chosen = logits.gather(-1, torch.tensor(answer, device=device)[:, None])[:, 0]
            gaps += (logits.max(-1).values - chosen).tolist()
    return gaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m fine_tune")
    parser.add_argument("--decode", default="dynamic,compiled", help="DECODE strategies, comma-separated")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from fine_tune.data import render_prompt
    from fine_tune.data.templates import resolve_template
    from fine_tune.generation import generate_ids
    from fine_tune.recipe import Recipe

    cfg = compose(args.overrides)
    recipe = Recipe(cfg)
    started = time.perf_counter()
    model = recipe.model
    model.eval()
    tokenizer = recipe.tokenizer
    print(f"model ready in {time.perf_counter() - started:.1f} s", flush=True)
    template = resolve_template(cfg.dataset.get("template", "auto"), tokenizer)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    prompts = [render_prompt([{"role": "user", "content": q}], tokenizer, template) for q in questions]
    cuda = torch.cuda.is_available()

    results: dict[str, dict] = {}
    for decode in args.decode.split(","):
        seconds, rows = [], []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            rows = generate_ids(model, tokenizer, prompts, args.new_tokens, decode=decode)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
        gaps = greedy_gaps(model, prompts, rows, tokenizer.eos_token_id)
        results[decode] = {
            "first_call_s": round(seconds[0], 3),
            "steady_call_s": round(steady, 3),
            "new_tokens_per_s_per_sequence": round(args.new_tokens / steady, 2),
            "greedy_gap_max": round(max(gaps), 4),
            "greedy_gap_median": round(statistics.median(gaps), 4),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        }
        print(decode, json.dumps(results[decode]), flush=True)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    report = {"device": device, "prompts": args.prompts, "new_tokens": args.new_tokens, "results": results}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
