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
    """Training FLOPs of one token (formula in the module docstring), the weights counted from the
    shapes the planner counts (fine_tune.families.shapes: a model type no family reads counts as the
    default family's, attention and a dense MLP); None for an object that is no transformers config.
    `trainable`: (name, numel) of the trainable weights; `reference_forward`: a DPO step's forward of
    the reference."""
    from fine_tune.families import family_of, get_family
    from fine_tune.families.shapes import expert_matrices, layer_kinds, layer_linears, shapes_from
    from fine_tune.schema import ModelSchema, default

    if not hasattr(config, "to_dict"):
        return None
    values = config.to_dict()
    s = shapes_from(values, family_of(values) or get_family(default(ModelSchema, "family")))
    routed = s.num_experts_per_tok if s.moe else 1
    frozen = s.vocab_size * s.hidden_size  # the LM head
    for sparse, layers in layer_kinds(s):
        weights = sum(i * o for i, o in layer_linears(s, sparse).values())
        if sparse:  # the experts a token is routed to, and the router
            weights += (
                routed * sum(i * o for i, o in expert_matrices(s).values()) + s.hidden_size * s.num_experts
            )
        frozen += layers * weights
    share = routed / s.num_experts if s.moe else 1.0
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
