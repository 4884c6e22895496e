"""4-bit numerics do not depend on the CPU model or on whether an eval ran.

bitsandbytes 0.50 repacks a `Linear4bit` weight for a bf16 AVX512 kernel the first time the layer runs
in inference mode on a CPU with AVX512-BF16 (fine_tune/models/quant.py: pin_portable_4bit_layout).
These tests make bitsandbytes believe it runs on such a CPU (it decides when a layer is built), so
they fail without the fix on every CPU, not only on the ones that have the instruction set.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from helpers import FAST, compose

from fine_tune.models.quant import CPU_REPACK_FLAG


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """What `Linear4bit.__init__` sees on a CPU with AVX512-BF16 (recent Xeon / EPYC)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def tiny_qlora(overrides: list[str]):
    from fine_tune.adapters import attach_adapter
    from fine_tune.utils.build import build

    cfg = compose([*FAST, "quant=nf4", *overrides])
    loaded = build(cfg.model, quant=cfg.quant, seed=cfg.seed)
    torch.manual_seed(0)
    model = attach_adapter(loaded.model, build(cfg.lora), False)
    return model, loaded.tokenizer


def loss_and_grads(model, ids):
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # the same LoRA dropout masks in both steps
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("model_option", ["tiny_mistral", "tiny_mixtral"])
def test_an_eval_changes_neither_the_weights_nor_the_next_training_step(avx512bf16_cpu, model_option):
    model, _ = tiny_qlora([f"model={model_option}"])
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m, CPU_REPACK_FLAG) for m in layers)
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before, grads_before = loss_and_grads(model, ids)

    model.eval()
    with torch.no_grad():  # what evaluation and generation samples do between training steps
        model(input_ids=ids)
    loss_after, grads_after = loss_and_grads(model, ids)

    assert torch.equal(loss_before, loss_after)
    assert grads_before.keys() == grads_after.keys() and grads_before
    for name, grad in grads_before.items():
        assert torch.equal(grad, grads_after[name]), name
    after = model.state_dict()
    assert after.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(value, after[key]), key


def test_pinning_turns_the_repacking_off_on_every_4bit_layer():
    from fine_tune.models.quant import pin_portable_4bit_layout

    layer = bnb.nn.Linear4bit(16, 16, quant_type="nf4")
    setattr(layer, CPU_REPACK_FLAG, True)
    container = torch.nn.Sequential(layer, torch.nn.Linear(16, 16))
    assert pin_portable_4bit_layout(container) is container
    assert getattr(layer, CPU_REPACK_FLAG) is False
