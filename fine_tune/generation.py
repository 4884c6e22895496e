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

from collections.abc import Sequence
from typing import Any


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer: Any = None,
) -> list[str]:
    """The completion of each tokenized prompt: greedy unless `temperature > 0`, at most
    `max_new_tokens` tokens, cut at the first EOS (rows that finish early are padded by generate)."""
    import torch

    from fine_tune.distributed import is_sharded

    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = max(len(ids) for ids in prompts)
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
    device = next(model.parameters()).device
    with torch.no_grad():
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
    return [decode_completion(tokenizer, row[width:].tolist()) for row in output]


def decode_completion(tokenizer: Any, ids: list[int]) -> str:
    """The text up to (not including) the first EOS; what follows is generate's padding."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)
