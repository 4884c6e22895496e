"""Samples and `fine_tune.generate` answer several prompts in one left-padded batch with a KV cache;
greedy, the text is the same as one prompt at a time (fp32, CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose, run_tool, tiny_run

QUESTIONS = [
    "Hi",
    "What is the capital of France, and why is it famous?",
    "Name three prime numbers larger than twenty and explain how you checked them.",
    "Why?",
]


def one_at_a_time(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """The reference: an unpadded prompt, plain `generate`, decoded up to EOS."""
    input_ids = torch.tensor([ids])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def adapted():
    """The tiny model (fp32, CPU) with an adapter that changes the answers, as a trained one does,
    its tokenizer and the questions rendered (each of another length: left padding differs by row)."""
    from peft import LoraConfig, get_peft_model

    from fine_tune.data import render_prompt
    from fine_tune.recipe import Recipe

    recipe = Recipe(compose(["trainer=cpu"]))
    tokenizer, base = recipe.tokenizer, recipe.base.model
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    prompts = [render_prompt([{"role": "user", "content": q}], tokenizer, "mistral_v1") for q in QUESTIONS]
    assert len({len(ids) for ids in prompts}) == len(prompts)
    return model, tokenizer, prompts


def test_batched_greedy_equals_one_prompt_at_a_time(adapted):
    from fine_tune.generation import generate_batch

    model, tokenizer, prompts = adapted
    with torch.no_grad():
        expected = [one_at_a_time(model, tokenizer, ids, 12) for ids in prompts]
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=12)
    assert batched == expected
    assert len(set(batched)) > 1 and all(batched)


def test_compiled_decode_gives_the_dynamic_cache_answers(adapted):
    """`compiled` preallocates the cache and pads prompts to a multiple of BUCKET (a CPU runs that
    step eagerly; the compiled GPU step is checked by benchmarks/generate_bench.py's greedy gap)."""
    from fine_tune.generation import BUCKET, generate_ids

    model, tokenizer, prompts = adapted
    assert max(len(ids) for ids in prompts) % BUCKET  # the bucket really widens this batch
    dynamic = generate_ids(model, tokenizer, prompts, 12, decode="dynamic")
    compiled = generate_ids(model, tokenizer, prompts, 12, decode="compiled")
    assert compiled == dynamic
    assert len({tuple(ids) for ids in dynamic}) > 1


def test_auto_decode_compiles_only_on_a_gpu_and_only_when_it_pays(adapted):
    from fine_tune.generation import COMPILE_PAYS_AFTER, choose_decode

    model = adapted[0]
    assert choose_decode("auto", model, 10 * COMPILE_PAYS_AFTER) == "dynamic"  # a CPU model
    assert choose_decode("compiled", model, 1) == "compiled"
    assert choose_decode("dynamic", model, 10 * COMPILE_PAYS_AFTER) == "dynamic"
    # the device its weights are on is all that `auto` reads of a model
    on_gpu = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda"))]))
    assert choose_decode("auto", on_gpu, COMPILE_PAYS_AFTER) == "compiled"
    assert choose_decode("auto", on_gpu, COMPILE_PAYS_AFTER - 1) == "dynamic"
    with pytest.raises(ValueError, match="decode"):
        choose_decode("graphs", model, 1)


@pytest.mark.subprocess
def test_generate_answers_a_file_of_prompts_in_batches(tmp_path: Path):
    """`python -m fine_tune.generate prompts=<file>`, through the tool's main in this process."""
    run = tiny_run()
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS[1:]) + "\n\n")  # blank lines are skipped
    args = [f"run={run}", f"prompts={questions}", "batch_size=2", "max_new_tokens=8"]
    rows = [json.loads(line) for line in run_tool("fine_tune.generate", args).splitlines()]
    assert [row["prompt"] for row in rows] == QUESTIONS[1:]
    single = run_tool(
        "fine_tune.generate", [f"run={run}", f"prompt={QUESTIONS[2]}", "max_new_tokens=8", "stream=false"]
    )
    assert single.strip() == rows[1]["completion"].strip()  # batched next to another prompt
