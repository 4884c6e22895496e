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
    """Records what was packed, fetched and unpacked, in order."""

    def __init__(self) -> None:
        super().__init__(min_bytes=0, devices=("cpu",))
        self.log: list[tuple[str, int]] = []

    def pack(self, tensor):
        item = super().pack(tensor)
        self.log.append(("pack", item.index))
        return item

    def _fetch(self, item) -> None:
        if item.fetched is None:
            self.log.append(("fetch", item.index))
        super()._fetch(item)

    def unpack(self, packed):
        self.log.append(("unpack", packed.index))
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

    packed = [i for kind, i in recording.log if kind == "pack"]
    assert len(packed) >= layers  # each checkpointed layer's input at least
    assert sorted(i for kind, i in recording.log if kind == "unpack") == packed  # each came back once
    for index in packed[:-1]:  # the backward runs in reverse: each was fetched while the next recomputed
        assert recording.log.index(("fetch", index)) < recording.log.index(("unpack", index))
    assert recording.items == []  # nothing of this step carried into the next


def test_offload_is_for_gpus_only(monkeypatch):
    from fine_tune import hardware

    monkeypatch.setattr(hardware, "has_cuda", lambda: False)
    assert offloads({"offload": True}) is False
    monkeypatch.setattr(hardware, "has_cuda", lambda: True)
    assert offloads({"offload": True}) is True and offloads({"offload": False}) is False
