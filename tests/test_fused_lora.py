"""`trainer.fused_lora` changes how a LoRA layer is computed, not what is trained: on CPU, a training
step's loss and every adapter gradient equal PEFT's own forward and backward (same dropout masks,
same seed), on a bf16 base, a 4-bit base and under autocast; layers it cannot fuse run PEFT's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_engine import build_engine, seeded_step

from fine_tune.training import fused_lora
from fine_tune.training.fused_lora import LoraLinear, fused_forwards, swapped_forwards

# fp32 on CPU: the two paths sum the same products in another order (the scale applied to the GEMM
# instead of its output, the two input gradients accumulated in one buffer)
FP32 = {"rtol": 1e-5, "atol": 1e-6}


def step(trainer, batch: dict, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.args.fused_lora = fused
    return seeded_step(trainer, batch)


def counted_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many LoRA forwards went through the fused function (so a test cannot pass by never fusing)."""
    calls = []
    original = LoraLinear.apply

    def apply(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(LoraLinear, "apply", apply)
    return calls


@pytest.mark.parametrize(
    ("quant", "dropout"),
    [("none", 0.0), ("none", 0.1), ("nf4", 0.0), ("nf4", 0.1)],
)
def test_a_fused_step_trains_what_peft_trains(tmp_path: Path, monkeypatch, quant: str, dropout: float):
    overrides = [f"quant={quant}", f"lora.lora_dropout={dropout}", "dataset.packing=true"]
    trainer, _ = build_engine(tmp_path, overrides)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    for module, *_ in fused_lora.fusable_layers(trainer.model):  # B = 0 at init would hide A's gradient
        torch.nn.init.normal_(next(iter(module.lora_B.values())).weight, std=0.02)
    peft_loss, peft_grads = step(trainer, batch, fused=False)
    calls = counted_calls(monkeypatch)
    loss, grads = step(trainer, batch, fused=True)
    layers = trainer.model.config.num_hidden_layers
    assert len(calls) == 7 * layers  # every adapted projection of every layer, once
    torch.testing.assert_close(loss, peft_loss, **FP32)
    assert grads.keys() == peft_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_grads[name], **FP32, msg=name)
    assert not any("forward" in vars(m) for m, *_ in fused_lora.fusable_layers(trainer.model))  # PEFT's again


def test_under_autocast_it_matches_peft_in_bf16(tmp_path: Path):
    """GPU runs train bf16 activations with fp32 adapters under autocast: the fused path casts the
    adapter as autocast does and returns fp32 gradients for the fp32 weights."""
    trainer, _ = build_engine(tmp_path, ["quant=none", "lora.lora_dropout=0.1"])
    model = trainer.model.to(torch.bfloat16)
    for module, *_ in fused_lora.fusable_layers(model):
        module.lora_A["default"].float()
        torch.nn.init.normal_(module.lora_B["default"].float().weight, std=0.02)
    x = torch.randn(2, 16, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    layer = model.base_model.model.model.layers[0].mlp

    def run(fused: bool):
        torch.manual_seed(0)
        x.grad = None
        layer.zero_grad(set_to_none=True)
        forwards = fused_forwards(model) if fused else []
        with torch.autocast("cpu", dtype=torch.bfloat16), swapped_forwards(forwards):
            out = layer(x)
        out.float().square().mean().backward()
        return out, x.grad, {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}

    def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())

    out, x_grad, grads = run(fused=False)
    fused_out, fused_x_grad, fused_grads = run(fused=True)
    # bf16 (8 bits of mantissa, eps 0.0078): PEFT rounds the adapter's output, its scaled copy and the
    # sum; the fused GEMM rounds once. Elementwise a rounding apart; as a whole within about one eps
    # (measured: 0.002-0.005 on an AMD EPYC)
    assert relative_error(fused_out, out) < 1e-2
    assert relative_error(fused_x_grad, x_grad) < 1e-2
    for name, grad in grads.items():
        assert fused_grads[name].dtype == torch.float32
        assert relative_error(fused_grads[name], grad) < 2e-2, name


def test_layers_it_cannot_fuse_run_peft(tmp_path: Path, monkeypatch):
    trainer, _ = build_engine(tmp_path, ["quant=none", "lora=dora"])
    assert list(fused_lora.fusable_layers(trainer.model)) == []  # DoRA: PEFT's variant forward
    trainer, _ = build_engine(tmp_path / "b", ["quant=none"])
    model = trainer.model
    calls = counted_calls(monkeypatch)
    ids = torch.tensor([[1, 5, 7, 9]])
    with swapped_forwards(fused_forwards(model)), model.disable_adapter():  # a DPO reference forward
        model(input_ids=ids)
    assert calls == []
    with swapped_forwards(fused_forwards(model)):
        model(input_ids=ids)
    assert len(calls) == 7 * model.config.num_hidden_layers


def test_auto_is_on_with_cuda_only_and_off_under_fsdp(monkeypatch):
    """`true` under FSDP is refused before anything loads: support_matrix.REFUSED."""
    from fine_tune import hardware
    from fine_tune.training.arguments import resolve_fused_lora

    monkeypatch.setattr(hardware, "has_cuda", lambda: False)
    assert resolve_fused_lora("auto", "ddp") is False and resolve_fused_lora(True, "ddp") is True
    monkeypatch.setattr(hardware, "has_cuda", lambda: True)
    assert resolve_fused_lora("auto", "ddp") is True and resolve_fused_lora("auto", "fsdp") is False
