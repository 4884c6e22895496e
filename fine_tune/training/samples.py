"""Generated samples at each evaluation: the same held-out prompts, greedy, bounded length.

Loss curves say little about what a fine-tune learned; a fixed set of prompts answered at every eval
shows it (and shows a broken template or EOS handling long before the run ends). Greedy decoding and
fixed prompts make samples comparable across steps and runs; the RNG is forked around generation so
that sampling never changes the training that follows (exact resume depends on it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from fine_tune.hardware import is_main_process
from fine_tune.training.throughput import PhaseTimer
from fine_tune.utils.io import append_jsonl

log = logging.getLogger("fine_tune")


def generate_completion(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy completion of one prompt (one at a time: no padding side effects, prompts are few)."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,  # training runs without a KV cache (packing); decoding wants one
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True)


class SampleCallback(TrainerCallback):
    """Writes samples.jsonl rows {step, index, prompt, completion, reference, where} and logs them."""

    def __init__(
        self,
        run_dir: Path,
        tracker: Any,
        tokenizer: Any,
        prompts: list[dict],
        num_prompts: int,
        max_new_tokens: int,
        eval_steps: int,
        timer: PhaseTimer | None = None,
    ) -> None:
        self.path = Path(run_dir) / "samples.jsonl"
        self.tracker = tracker
        self.tokenizer = tokenizer
        self.prompts = list(prompts)[: max(int(num_prompts), 0)]
        self.max_new_tokens = int(max_new_tokens)
        self.eval_steps = int(eval_steps)
        self.last_step: int | None = None
        self.timer = timer or PhaseTimer()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        due = step % self.eval_steps == 0 or (state.max_steps > 0 and step >= state.max_steps)
        if due and self.prompts and self.max_new_tokens > 0 and model is not None:
            self.sample(model, step)
        return control

    def sample(self, model: Any, step: int) -> list[dict]:
        import torch

        if self.last_step == step:
            return []
        self.last_step = step
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        was_training = model.training
        model.eval()
        rows = []
        try:
            with self.timer.measure("samples"), torch.random.fork_rng(devices=devices), torch.no_grad():
                for index, prompt in enumerate(self.prompts):
                    completion = generate_completion(
                        model, self.tokenizer, prompt["prompt_ids"], self.max_new_tokens
                    )
                    rows.append(
                        {
                            "step": step,
                            "index": index,
                            "prompt": prompt.get("prompt_text")
                            or self.tokenizer.decode(prompt["prompt_ids"]),
                            "completion": completion,
                            "reference": prompt.get("reference"),
                            "where": prompt.get("where"),
                        }
                    )
        finally:
            model.train(was_training)
        if is_main_process():
            for row in rows:
                append_jsonl(self.path, row)
            self.tracker.log_samples(rows, step=step)
            if rows:
                first = rows[0]
                log.info("step %d sample: %r -> %r", step, first["prompt"][-60:], first["completion"][:80])
        return rows
