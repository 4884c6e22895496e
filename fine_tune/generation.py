"""Answering several prompts in one `generate` call: the samples logged at each evaluation and
`python -m fine_tune.generate` share it.

Decoding is one forward per new token, so prompts answered one at a time pay that loop once per
prompt; a batch pays it once. Prompts are left-padded so every row's last prompt token sits at the
same column and new tokens line up; transformers derives position ids from the attention mask, so
a padded prompt is encoded as it would be alone and greedy decoding gives the same text as one
prompt at a time (tested in fp32). The KV cache is on (training turns it off in the model config)
and the adapter stays as trained: nothing is merged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any


def generate_batch(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options: Any
) -> list[str]:
    """The completion of each tokenized prompt (options: generate_ids'), cut at the first EOS."""
    rows = generate_ids(model, tokenizer, prompts, max_new_tokens, **options)
    return [decode_completion(tokenizer, ids) for ids in rows]


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer: Any = None,
    decode: str = "dynamic",
) -> list[list[int]]:
    """The new token ids of each prompt: greedy unless `temperature > 0`, at most `max_new_tokens`,
    EOS and generate's padding included (rows that finish early are padded).

    `decode` (DECODE; `auto` judged on this call alone, callers that know the work ahead resolve it
    with choose_decode): how each one-token step runs. A step of a 7B model is hundreds of small
    kernels (every projection with its adapter), so on a GPU its time is Python and launches, not
    arithmetic: compiled removes that once it has paid for its compile.
    """
    import torch

    from fine_tune.distributed import is_sharded

    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    decode = choose_decode(decode, model, int(max_new_tokens))
    width = max(len(ids) for ids in prompts)
    if decode == "compiled":
        width = -(-width // BUCKET) * BUCKET
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    options: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        options.update(temperature=float(temperature), top_p=float(top_p))
    # FSDP: each generated token gathers weights from every rank, so all ranks go on until all are
    # done; transformers would not know (it asks PEFT's inner model, which is not FSDP's module).
    if is_sharded(model):
        options["synced_gpus"] = True
    options.update(decode_options(decode))
    device = next(model.parameters()).device
    with torch.no_grad(), bitsandbytes_compilable(model):
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=int(max_new_tokens),
            num_beams=1,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=eos,
            streamer=streamer,
            **options,
        )
    return [row[width:].tolist() for row in output]


# `decode`: how each one-token step runs (trainer.generation.decode, generate's decode=).
DECODE = ("auto", "dynamic", "compiled")
# Measured on one H100 (benchmarks/generate_bench.py, Mistral-7B nf4, 4 prompts x 32 new tokens):
# compiling the step costs ~56 s once, after which a step takes 22 ms instead of 74 ms; so compiling
# pays for itself after about this many one-token steps.
COMPILE_PAYS_AFTER = 1100
BUCKET = 64  # compiled: prompt widths padded to a multiple of this, so calls share compiled steps


def choose_decode(decode: str, model: Any, steps: int) -> str:
    """`auto`: compiled on a CUDA GPU when the one-token steps ahead (`steps`, all calls together)
    repay the compile, else dynamic. Sharded (FSDP) models decode eagerly: each step gathers weights
    from the other ranks."""
    from fine_tune.distributed import is_sharded

    if decode not in DECODE:
        raise ValueError(f"decode must be one of {DECODE}, got {decode!r}")
    if is_sharded(model):
        return "dynamic"
    if decode == "auto":
        on_gpu = next(model.parameters()).device.type == "cuda"
        return "compiled" if on_gpu and steps >= COMPILE_PAYS_AFTER else "dynamic"
    return decode


def decode_options(decode: str) -> dict[str, Any]:
    """generate() options: dynamic grows the cache by a column per token; compiled preallocates it
    for the whole answer (a static cache), which gives every step the same shapes, and transformers
    then compiles the step with inductor and replays it as CUDA graphs (on a GPU only; a CPU runs
    the static cache eagerly, which is what the CPU tests check against dynamic)."""
    return {"cache_implementation": "static"} if decode == "compiled" else {}


@contextlib.contextmanager
def bitsandbytes_compilable(model: Any) -> Iterator[None]:
    """transformers will not compile the step of a model loaded with a bitsandbytes config (its
    quantizer says `is_compileable = False`, from before bitsandbytes' kernels were torch custom
    ops); the 4-bit layers our own builder makes are the same layers, and their compiled step
    decodes greedily as the eager one does (benchmarks/generate_bench.py). The veto is lifted for
    the call, for bitsandbytes only."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(inner, "hf_quantizer", None)
    if quantizer is None or not type(quantizer).__name__.startswith("Bnb"):
        yield
        return
    inner.hf_quantizer = None
    try:
        yield
    finally:
        inner.hf_quantizer = quantizer


def decode_completion(tokenizer: Any, ids: list[int]) -> str:
    """The text up to (not including) the first EOS; what follows is generate's padding."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)
