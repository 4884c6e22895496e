"""Honest speed figures: the training clock leaves the pauses out, and MFU uses the stated formula
(docs/speed.md) and a known GPU peak, or is absent."""

from __future__ import annotations

import pytest
from helpers import tiny_mixtral_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_training_clock_takes_the_pauses_out(monkeypatch):
    from fine_tune.training import throughput

    clock = FakeClock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    timer = throughput.PhaseTimer()
    training = throughput.TrainingClock(timer)
    training.start(tokens=1000)  # a resumed run: tokens seen before this process do not count
    clock.now += 4.0  # training
    with timer.measure("eval"):
        clock.now += 3.0
        with timer.measure("checkpoint"):  # nested: counted once, by the outer phase
            clock.now += 1.0
    with timer.measure("samples"):
        clock.now += 2.0
    clock.now += 1.0  # training
    assert training.lap(tokens=1500) == (5.0, 500)
    clock.now += 2.0
    assert training.lap(tokens=1900) == (2.0, 400)
    assert (training.seconds, training.tokens) == (7.0, 900)
    assert timer.seconds == {"eval": 4.0, "samples": 2.0, "checkpoint": 0.0}


def test_flops_per_token_of_lora_on_a_moe():
    from fine_tune.training.throughput import flops_per_token, mfu

    config = tiny_mixtral_config()  # h 64, 4 heads of 16, 2 KV heads, 4 experts of 128, top-2, vocab 256
    attention = 64 * 16 * 4 + 64 * 16 * 2 + 64 * 16 * 2 + 16 * 4 * 64  # q, k, v, o
    routed_mlp = 2 * 3 * 64 * 128 + 64 * 4  # two experts of three matrices, and the router
    frozen = 2 * (attention + routed_mlp) + 256 * 64  # two layers and the LM head
    adapters = 100 + 80 * 2 / 4  # an attention adapter, and expert adapters used by 2 of 4 experts
    trainable = [("layers.0.self_attn.q_proj.lora_A.weight", 100), ("layers.0.mlp.experts.lora.A", 80)]
    assert flops_per_token(config, trainable) == 4 * frozen + 6 * adapters
    assert mfu(1000.0, 2e9, 1e15) == pytest.approx(2e-3)
    assert mfu(1000.0, 2e9, None) is None and flops_per_token(object(), []) is None


def test_mistral_7b_flops_per_token():
    """The figure docs/speed.md quotes: 28.7 GFLOP per token (a 6 x N count would say 43.4)."""
    from transformers import MistralConfig

    from fine_tune.training.throughput import flops_per_token

    config = MistralConfig(num_key_value_heads=8)  # Mistral-7B: 32 layers, 4096 wide, MLP 14336
    lora = 41_943_040  # r=16 on all 7 projections
    flops = flops_per_token(config, [("q_proj.lora_A", lora)])
    assert flops == 4 * 7_110_393_856 + 6 * lora
    assert flops / 1e9 == pytest.approx(28.69, abs=0.01)


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H200", "fp16", 989e12),
        ("NVIDIA L40S", "bf16", 362e12),
        ("NVIDIA H100 80GB HBM3", "fp32", None),
        ("Some Future GPU", "bf16", None),
    ],
)
def test_peak_flops_table(monkeypatch, name, precision, expected):
    import torch

    from fine_tune import hardware

    monkeypatch.setattr(hardware, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert hardware.peak_flops(precision) == expected


def test_no_peak_on_cpu():
    from fine_tune.hardware import peak_flops

    assert peak_flops("bf16") is None
