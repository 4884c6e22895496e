"""Model families: each is one module plus one YAML, and a second MoE family (Qwen2-MoE) goes the
whole way Mixtral does: a checkpoint saved by transformers trains with 4-bit experts and LoRA on them,
planned by the memory planner. An MoE layout no family describes stops with a UserError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from helpers import CONF, TINY_QWEN2_MOE, TINY_SHAPE, checked, compose, tiny_qwen2_moe_config
from test_train import train_in_process

from fine_tune.errors import UserError
from fine_tune.families import families, family_of, is_moe
from fine_tune.families.shapes import model_shapes


def save(config, path: Path) -> str:
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


VOCAB = {"vocab_size": 32000}  # Mistral's vocabulary: model.tokenizer=mistral_v1 fits the tiny models


def local(path: str, *overrides: str) -> list[str]:
    return ["model=local", f"model.name_or_path={path}", "model.tokenizer=mistral_v1", *overrides]


def test_each_family_is_a_module_with_a_model_option():
    assert {"mistral", "mixtral", "qwen2_moe"} <= set(families())
    options = {
        compose([f"model={p.stem}", "model.name_or_path=/m"]).model.family
        for p in (CONF / "model").glob("*.yaml")
    }
    assert set(families()) <= options
    for family in families().values():
        assert family_of({"model_type": family.model_types[0]}) is family
        assert is_moe(family.reference) == (family.checkpoint_experts is not None)


def test_local_qwen2_moe_trains_with_4bit_experts_and_expert_lora(tmp_path):
    """The issue's case: model=local with a tiny Qwen2-MoE saved by transformers, quant=nf4."""
    from fine_tune.models.moe import Experts4bit
    from fine_tune.plan import plan_memory

    path = save(tiny_qwen2_moe_config(**VOCAB), tmp_path / "qwen")
    overrides = local(path, "quant=nf4", "lora=attn_experts", "trainer.max_steps=4", "trainer.eval_steps=4")
    cfg, _, metrics, trainer = train_in_process(tmp_path, overrides)
    experts = [m for m in trainer.model.modules() if isinstance(m, Experts4bit)]
    assert len(experts) == 2 and all(set(m.adapters) == {"gate_up_proj", "down_proj"} for m in experts)
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    # the checkpoint's config.json says qwen2_moe, whatever model.family (mistral, from model=local) says
    plan = plan_memory(cfg)
    assert cfg.model.family == "mistral" and plan.description.startswith("qwen2_moe")
    assert plan.trainable_params == metrics["trainable_params"]


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_local_llama_trains(tmp_path, quant):
    """A family fine_tune has no module for still loads through transformers."""
    path = save(transformers.LlamaConfig(**{**TINY_SHAPE, **VOCAB}), tmp_path / "llama")
    _, _, metrics, _ = train_in_process(tmp_path, local(path, f"quant={quant}", "trainer.max_steps=2"))
    assert metrics["steps"] == 2
    assert (
        model_shapes({"family": "mistral", "name_or_path": path, "init": "pretrained"}).family.name
        == "mistral"
    )


def test_an_unknown_moe_layout_is_a_user_error(tmp_path):
    from fine_tune.recipe import Recipe

    path = save(transformers.Qwen3MoeConfig(**{**TINY_SHAPE, **TINY_QWEN2_MOE, **VOCAB}), tmp_path / "qwen3")
    cfg = checked(local(path, "quant=nf4"))
    with pytest.raises(UserError) as error:
        _ = Recipe(cfg).model
    assert "qwen3_moe" in str(error.value) and error.value.where == "model.name_or_path"
