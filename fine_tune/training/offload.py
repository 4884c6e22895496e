"""Offloaded checkpoints whose copies overlap the compute (`trainer.checkpointing.offload=true`).

A checkpointed decoder layer keeps only its input for the backward (64 MiB per layer for a packed
batch of 8,192 tokens of Mistral-7B); offloading keeps it in pinned host memory instead, which is
how a QLoRA step of Mistral-7B fits in 6 GiB. transformers' offload (`save_on_cpu`) copies on the
compute stream, so every copy, both ways, waits in line with the matmuls: on an H100 the step was
~7% slower (docs/speed.md). Here the device-to-host copy runs on a side stream while the next layer
computes, and in the backward the input of the layer before is fetched while this one recomputes.
Host tensors (CPU runs) are left where they are.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

#: tensors smaller than this stay where they are (position ids, masks): a copy costs more than it frees
MIN_BYTES = 1 << 20


@dataclass
class _Offloaded:
    host: torch.Tensor
    device: torch.device
    layer: int  # which checkpointed call saved it, in forward order
    fetched: torch.Tensor | None = None
    unpacked: bool = False  # given to the backward: no fetch ahead any more
    ready: Any = None  # torch.cuda.Event: the fetch has landed


class OverlappedOffload:
    """saved_tensors_hooks for the inputs that checkpointed layers save, one instance per trainer.

    Items are grouped by the checkpointed call that saved them, in forward order; the backward
    recomputes layers in the reverse order, so the first unpack of layer L's items fetches all of
    them and starts the fetch of layer L - 1's. A layer may save more than its hidden states (in
    torch 2.11 a second tensor, in 2.13 not), and the order of those within a layer is not fixed."""

    def __init__(self, min_bytes: int = MIN_BYTES, devices: tuple[str, ...] = ("cuda",)) -> None:
        self.min_bytes = min_bytes
        self.devices = devices  # tests add "cpu": the same bookkeeping, copies without streams
        self.stream: Any = None
        self.layers: list[list[_Offloaded]] = []  # this step's items, by checkpointed call

    def _side_stream(self) -> Any:
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def pack(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type not in self.devices or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        if tensor.device.type == "cuda":
            side = self._side_stream()
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            side.wait_stream(torch.cuda.current_stream())  # the tensor is computed before it is copied
            with torch.cuda.stream(side):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(side)  # its memory is not reused before the copy has read it
        else:
            host = tensor.clone()
        item = _Offloaded(host, tensor.device, len(self.layers) - 1)
        self.layers[-1].append(item)
        return item

    def _fetch(self, item: _Offloaded) -> None:
        if item.fetched is not None:
            return
        if item.device.type != "cuda":
            item.fetched = item.host.clone()
            return
        side = self._side_stream()
        with torch.cuda.stream(side):
            item.fetched = item.host.to(item.device, non_blocking=True)
            item.ready = torch.cuda.Event()
            item.ready.record(side)

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        self._fetch(packed)
        tensor, packed.fetched, packed.unpacked = packed.fetched, None, True
        if packed.ready is not None:
            current = torch.cuda.current_stream()
            current.wait_event(packed.ready)
            tensor.record_stream(current)
        ahead = self.layers[packed.layer - 1] if packed.layer > 0 else []
        for item in self.layers[packed.layer] + ahead:  # the rest of this layer's, and the layer before's
            if not item.unpacked:
                self._fetch(item)
        return tensor

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One forward and backward: items of an earlier step are never fetched ahead."""
        self.layers = []
        try:
            yield
        finally:
            self.layers = []

    def around(self, checkpoint: Callable) -> Callable:
        """`checkpoint` with what it saves for the backward (the layer's inputs) offloaded."""

        @functools.wraps(checkpoint)
        def offloaded(*args: Any, **kwargs: Any) -> Any:
            self.layers.append([])  # what this call saves; its recompute in the backward saves nothing here
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint(*args, **kwargs)

        offloaded.offloaded = True
        return offloaded


def offload_checkpoints(model: Any, offload: OverlappedOffload) -> int:
    """Wrap the checkpointing function of every checkpointed layer of `model` (once); how many."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # what calls the function

    layers = [
        module
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False)
    ]
    for layer in layers:
        if not getattr(layer._gradient_checkpointing_func, "offloaded", False):
            layer._gradient_checkpointing_func = offload.around(layer._gradient_checkpointing_func)
    return len(layers)
