"""End-to-end training of the tiny models on CPU: the default run from the command line, quantized
Mixtral, adapter round-trip through plain PEFT, and seed determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAST, cli, compose

from fine_tune.adapters import ADAPTER_CONFIG


def train_in_process(tmp_path: Path, overrides: list[str]):
    from hydra.utils import instantiate

    from fine_tune.run import train

    cfg = compose([*FAST, *overrides])
    tracker = instantiate(cfg.logger)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    metrics, trainer = train(cfg, run_dir, tracker, job={"overrides": overrides})
    return cfg, run_dir, metrics, trainer


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def fresh_base(cfg):
    from fine_tune.utils.build import build

    return build(cfg.model, quant=cfg.quant, seed=cfg.seed).model


def logits_of(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(
        ["[INST] What is 3 plus 4? [/INST]", "Paris is the capital of"], return_tensors="pt", padding=True
    )
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.subprocess
def test_default_run_from_the_command_line(tmp_path: Path):
    """`python -m fine_tune` with no group overrides: trains, evaluates, saves, and the loss falls."""
    result = cli(["logger=none", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 60
    assert metrics["train_loss"] < metrics["first_train_loss"] - 1.0
    assert metrics["eval_loss"] is not None and metrics["tokens_seen"] > 0
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "finished"
    assert (tmp_path / "adapter" / ADAPTER_CONFIG).exists()
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    assert len(losses(tmp_path)) >= 10


def test_saved_adapter_reloads_with_plain_peft(tmp_path: Path):
    from peft import PeftModel

    cfg, run_dir, metrics, trainer = train_in_process(tmp_path, [])
    tokenizer = trainer.processing_class
    expected = logits_of(trainer.model, tokenizer)
    reloaded = PeftModel.from_pretrained(fresh_base(cfg), run_dir / "adapter")
    torch.testing.assert_close(logits_of(reloaded, tokenizer), expected, rtol=1e-5, atol=1e-5)
    assert metrics["train_loss"] < metrics["first_train_loss"]


def test_same_seed_same_losses(tmp_path: Path):
    first = losses(train_in_process(tmp_path / "a", ["seed=7"])[1])
    second = losses(train_in_process(tmp_path / "b", ["seed=7"])[1])
    other = losses(train_in_process(tmp_path / "c", ["seed=8"])[1])
    assert len(first) >= 5
    assert first == second
    assert first != other


def test_tiny_mixtral_nf4_trains(tmp_path: Path):
    """QLoRA on the MoE model: Linear layers and fused experts in 4-bit, LoRA trains, adapter reloads."""
    import bitsandbytes as bnb
    from peft import PeftModel

    cfg, run_dir, metrics, trainer = train_in_process(
        tmp_path,
        [
            "model=tiny_mixtral",
            "quant=nf4",
            "trainer.max_steps=30",
            "trainer.logging_steps=1",
            "optim.lr=5e-3",
            "optim.scheduler=constant",
        ],
    )
    model = trainer.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    experts = [m for m in model.modules() if type(m).__name__ == "Experts4bit"]
    assert len(experts) == cfg.model.architecture.num_hidden_layers
    history = losses(run_dir)
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5 - 0.3
    expected = logits_of(model, trainer.processing_class)
    reloaded = PeftModel.from_pretrained(fresh_base(cfg), run_dir / "adapter")
    torch.testing.assert_close(logits_of(reloaded, trainer.processing_class), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option", ["attn_only", "all_linear"])
def test_lora_options_train(tmp_path: Path, option: str):
    _, _, metrics, trainer = train_in_process(tmp_path, [f"lora={option}", "trainer.max_steps=4"])
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert (option == "attn_only") == (not any("mlp" in n for n in names))


def test_expert_lora_on_bf16_experts_uses_requested_rank(tmp_path: Path):
    """Without 4-bit, experts are adapted through PEFT's target_parameters at rank r per expert."""
    from peft import PeftModel

    cfg, run_dir, metrics, trainer = train_in_process(
        tmp_path, ["model=tiny_mixtral", "lora=attn_experts", "lora.r=4", "trainer.max_steps=4"]
    )
    experts = cfg.model.architecture.num_local_experts
    shapes = {
        n: tuple(p.shape) for n, p in trainer.model.named_parameters() if p.requires_grad and "experts" in n
    }
    assert shapes, "no expert adapters were trained"
    assert all(shape[0] == 4 * experts for n, shape in shapes.items() if "lora_A" in n)
    expected = logits_of(trainer.model, trainer.processing_class)
    reloaded = PeftModel.from_pretrained(fresh_base(cfg), run_dir / "adapter")
    torch.testing.assert_close(logits_of(reloaded, trainer.processing_class), expected, rtol=1e-5, atol=1e-5)


def test_an_eval_does_not_change_the_training_that_follows(tmp_path: Path):
    """Same seed, evals every 3 steps or none: every per-step training loss is identical."""
    steps = ["trainer.max_steps=8", "trainer.logging_steps=1", "trainer.generation.num_prompts=0"]
    runs = [
        losses(train_in_process(tmp_path / name, [*steps, f"trainer.eval_steps={every}"])[1])
        for name, every in (("with_eval", 3), ("without_eval", 1000))
    ]
    assert len(runs[0]) == 8
    assert runs[0] == runs[1]
