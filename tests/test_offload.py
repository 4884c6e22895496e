"""`trainer.checkpointing.offload`: the inputs that checkpointed layers keep for the backward go to
host memory and come back one layer ahead (fine_tune/training/offload.py). On CPU the same
bookkeeping runs with plain copies: a step's gradients are those without offload, every saved input
went through the offloader, and each one was fetched before the recompute that needed it."""

from __future__ import annotations

from pathlib import Path

import torch
from test_engine import build_engine, seeded_step

from fine_tune.training import offload as offload_module
from fine_tune.training.arguments import offloads
from fine_tune.training.offload import OverlappedOffload


class Recording(OverlappedOffload):
    """Records what was packed, fetched and unpacked, in order: (what, layer, item)."""

    def __init__(self) -> None:
        super().__init__(min_bytes=0, devices=("cpu",))
        self.log: list[tuple[str, int, int]] = []

    def pack(self, tensor):
        item = super().pack(tensor)
        self.log.append(("pack", item.layer, id(item)))
        return item

    def _fetch(self, item) -> None:
        if item.fetched is None:
            self.log.append(("fetch", item.layer, id(item)))
        super()._fetch(item)

    def unpack(self, packed):
        self.log.append(("unpack", packed.layer, id(packed)))
        return super().unpack(packed)


def test_offloaded_inputs_give_the_same_gradients_and_are_fetched_one_layer_ahead(tmp_path: Path):
    trainer, _ = build_engine(tmp_path, ["trainer.gradient_checkpointing=true", "dataset.packing=true"])
    model = trainer.model
    model.train()
    # as Trainer.train() does before the first step
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = next(iter(trainer.get_train_dataloader()))
    _, expected = seeded_step(trainer, batch)

    recording = trainer.offload = Recording()
    layers = model.config.num_hidden_layers
    assert offload_module.offload_checkpoints(model, recording) == layers
    assert offload_module.offload_checkpoints(model, recording) == layers  # wrapped once, not twice
    _, got = seeded_step(trainer, batch)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0, msg=name)

    packed = {item: layer for kind, layer, item in recording.log if kind == "pack"}
    assert sorted(set(packed.values())) == list(range(layers))  # each checkpointed layer's input at least
    unpacked = [item for kind, _, item in recording.log if kind == "unpack"]
    assert sorted(unpacked) == sorted(packed)  # each came back once
    position = {entry: i for i, entry in reversed(list(enumerate(recording.log)))}  # first occurrence
    for item, layer in packed.items():
        if layer < layers - 1:  # the backward runs in reverse: fetched while the layer after recomputed
            assert position["fetch", layer, item] < position["unpack", layer, item]
    assert recording.layers == []  # nothing of this step carried into the next


def test_offload_is_for_gpus_only(monkeypatch):
    from fine_tune import hardware

    monkeypatch.setattr(hardware, "has_cuda", lambda: False)
    assert offloads({"offload": True}) is False
    monkeypatch.setattr(hardware, "has_cuda", lambda: True)
    assert offloads({"offload": True}) is True and offloads({"offload": False}) is False


def test_a_layer_that_saves_several_inputs_is_fetched_whole_one_layer_ahead():
    """Layers may save more than their hidden states (in torch 2.11 they save two tensors), and the
    backward unpacks a layer's tensors in no fixed order: every one of the layer before is fetched
    ahead all the same."""
    import functools

    from torch.utils.checkpoint import checkpoint

    recording = Recording()
    run = recording.around(functools.partial(checkpoint, use_reentrant=False))
    weights = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    x = torch.randn(4, 8, requires_grad=True)
    scale = torch.randn(4, 8, requires_grad=True)  # a second input every layer saves

    def forward(h, s, w):
        return torch.tanh(h @ w) * s + s.sin()

    expected = x
    for w in weights:
        expected = forward(expected, scale, w)
    reference = torch.autograd.grad(expected.sum(), [x, scale, *weights])
    with recording.step():
        h = x
        for w in weights:
            h = run(forward, h, scale, w)
        got = torch.autograd.grad(h.sum(), [x, scale, *weights])
        layers = list(recording.layers)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # input, scale and weight, per layer (torch 2.11 saves a fourth: the CPU RNG state)
    assert len(layers) == 3 and all(len(items) >= 3 for items in layers)
    position = {entry: i for i, entry in reversed(list(enumerate(recording.log)))}
    for layer, items in enumerate(layers[:-1]):
        for item in items:
            assert position["fetch", layer, id(item)] < position["unpack", layer, id(item)]
