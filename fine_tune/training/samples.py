"""Generated samples at each evaluation: the same held-out prompts, greedy, bounded length.

Loss curves say little about what a fine-tune learned; a fixed set of prompts answered at every eval
shows it (and shows a broken template or EOS handling long before the run ends). Greedy decoding and
fixed prompts make samples comparable across steps and runs; the RNG is forked around generation so
that sampling never changes the training that follows (exact resume depends on it). All prompts go
in one batch (fine_tune.generation) and the time is kept out of the training throughput.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from fine_tune.generation import choose_decode, generate_batch
from fine_tune.hardware import is_main_process
from fine_tune.training.throughput import PhaseTimer
from fine_tune.utils.io import append_jsonl

log = logging.getLogger("fine_tune")


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
        decode: str = "dynamic",
    ) -> None:
        self.path = Path(run_dir) / "samples.jsonl"
        self.tracker = tracker
        self.tokenizer = tokenizer
        self.prompts = list(prompts)[: max(int(num_prompts), 0)]
        self.max_new_tokens = int(max_new_tokens)
        self.eval_steps = int(eval_steps)
        self.last_step: int | None = None
        self.timer = timer or PhaseTimer()
        self.decode = decode

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        due = step % self.eval_steps == 0 or (state.max_steps > 0 and step >= state.max_steps)
        if due and self.prompts and self.max_new_tokens > 0 and model is not None:
            if self.decode == "auto":  # the whole run's samples decide whether compiling pays
                rounds = state.max_steps // self.eval_steps + 1 if state.max_steps > 0 else 1
                self.decode = choose_decode("auto", model, rounds * self.max_new_tokens)
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
        try:
            with self.timer.measure("samples"), torch.random.fork_rng(devices=devices):
                completions = generate_batch(
                    model,
                    self.tokenizer,
                    [p["prompt_ids"] for p in self.prompts],
                    self.max_new_tokens,
                    decode=self.decode,
                )
        finally:
            model.train(was_training)
        rows = [
            {
                "step": step,
                "index": index,
                "prompt": prompt.get("prompt_text") or self.tokenizer.decode(prompt["prompt_ids"]),
                "completion": completion,
                "reference": prompt.get("reference"),
                "where": prompt.get("where"),
            }
            for index, (prompt, completion) in enumerate(zip(self.prompts, completions, strict=True))
        ]
        if is_main_process():
            for row in rows:
                append_jsonl(self.path, row)
            self.tracker.log_samples(rows, step=step)
            if rows:
                first = rows[0]
                log.info("step %d sample: %r -> %r", step, first["prompt"][-60:], first["completion"][:80])
        return rows
