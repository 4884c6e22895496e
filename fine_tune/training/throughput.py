"""Honest speed figures: training time without the pauses, and model FLOPs utilisation (MFU).

A run's wall time holds much that is not training: evaluation, generated samples, checkpoint saves
(and model loading before any of it). Tokens per second over all of that says little about the
training loop, so each pause is timed (`PhaseTimer.measure`) and taken out of the training clock.

MFU = trained tokens/s x model FLOPs per token / the GPU's dense peak FLOP/s (fine_tune.hardware).
FLOPs per token (docs/speed.md):  4 x N_frozen + 6 x N_adapter, where
  - N_frozen: weights of every matrix multiply a token goes through (attention projections, the
    MLP, or for MoE only the `num_experts_per_tok` experts it is routed to plus the router, the LM
    head); a frozen weight costs 2 FLOPs per token forward and 2 backward (the gradient of its input;
    no gradient of its own);
  - N_adapter: trainable (LoRA) weights, expert adapters scaled by the share of experts a token
    uses; 2 forward + 2 input gradient + 2 weight gradient;
  - DPO adds a reference forward of every token without gradients, the adapter off: + 2 x N_frozen.
Left out: attention scores (QK^T, AV: about 4% of Mistral-7B at 2048 tokens), norms and activations,
and the forward that gradient checkpointing recomputes (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

PAUSES = ("eval", "samples", "checkpoint")


def _synchronize() -> None:
    """GPU work is asynchronous: wait for it at a phase boundary so it is billed to the right phase."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Seconds spent in each pause of training (eval, samples, checkpoint)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PAUSES, 0.0)
        self._depth = 0

    @contextlib.contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        if self._depth:  # nested (an eval inside a save): the outer phase already counts it
            yield
            return
        _synchronize()
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.seconds[phase] += time.perf_counter() - start
            self._depth -= 1

    def paused(self) -> float:
        return sum(self.seconds.values())


class TrainingClock:
    """Training seconds and tokens between two readings, pauses taken out."""

    def __init__(self, timer: PhaseTimer) -> None:
        self.timer = timer
        self.seconds = 0.0  # training time of this process (a resumed run counts from its restart)
        self.tokens = 0
        self._wall = time.perf_counter()
        self._paused = 0.0
        self._at_tokens = 0

    def start(self, tokens: int) -> None:
        self._wall, self._paused, self._at_tokens = time.perf_counter(), self.timer.paused(), tokens

    def lap(self, tokens: int) -> tuple[float, int]:
        """(training seconds, tokens) since the last reading; added to the totals."""
        _synchronize()
        wall, paused = time.perf_counter(), self.timer.paused()
        seconds = max((wall - self._wall) - (paused - self._paused), 0.0)
        trained = tokens - self._at_tokens
        self._wall, self._paused, self._at_tokens = wall, paused, tokens
        self.seconds += seconds
        self.tokens += trained
        return seconds, trained


def flops_per_token(
    config: Any, trainable: Iterable[tuple[str, int]], reference_forward: bool = False
) -> float | None:
    """Training FLOPs of one token (formula in the module docstring); None for a config without the
    usual decoder fields, rather than a guess. `trainable`: (name, numel) of the trainable weights;
    `reference_forward`: a DPO step's forward of the reference."""
    try:
        hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
        heads, inter = config.num_attention_heads, config.intermediate_size
    except AttributeError:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    experts = int(getattr(config, "num_local_experts", 0) or 0)
    routed = int(getattr(config, "num_experts_per_tok", 0) or 0) if experts > 1 else 1
    attention = hidden * head_dim * 2 * (heads + kv_heads)
    mlp = 3 * hidden * inter * routed + (hidden * experts if experts > 1 else 0)
    frozen = layers * (attention + mlp) + vocab * hidden
    share = routed / experts if experts > 1 else 1.0
    adapters = sum(n * (share if "experts" in name else 1.0) for name, n in trainable)
    return (6.0 if reference_forward else 4.0) * frozen + 6.0 * adapters


def model_flops_per_token(model: Any, reference_forward: bool = False) -> float | None:
    """`flops_per_token` of a built (PEFT) model."""
    trainable = ((name, p.numel()) for name, p in model.named_parameters() if p.requires_grad)
    return flops_per_token(model.config, trainable, reference_forward)


def mfu(tokens_per_second: float | None, flops: float | None, peak: float | None) -> float | None:
    if not tokens_per_second or not flops or not peak:
        return None
    return tokens_per_second * flops / peak
