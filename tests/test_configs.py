"""Every option of every group composes, and every `_target_` it names exists and accepts the
option's keys, checked without loading any weights."""

from __future__ import annotations

import importlib
import inspect

import pytest
from conftest import CONF, compose
from omegaconf import OmegaConf

GROUPS = ["model", "quant", "lora", "dataset", "optim", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def all_options() -> list[tuple[str, str]]:
    return [(group, option) for group in GROUPS for option in options(group)]


def locate(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


def test_defaults_compose():
    cfg = compose()
    assert cfg.model.family == "mistral"
    assert cfg.quant.kind == "none"
    assert cfg.optim.lr == cfg.model.lr  # the optimizer follows the model's suggested learning rate


@pytest.mark.parametrize(("group", "option"), all_options())
def test_option_composes_and_target_binds(group: str, option: str):
    overrides = [f"{group}={option}"]
    if group == "model" and option == "local":
        overrides.append("model.name_or_path=/models/any")
    cfg = compose(overrides)
    node = cfg[group]
    OmegaConf.to_container(node, resolve=True)  # every interpolation resolves
    if group == "optim":  # the optimizer is a factory node one level down
        node = node.optimizer
    target = node.get("_target_")
    assert target, f"conf/{group}/{option}.yaml has no _target_"
    builder = locate(target)
    keys = {k: v for k, v in node.items() if not str(k).startswith("_")}
    if group == "optim":  # what the factory passes: inherited AdamW keys the class lacks are not
        from fine_tune.training.optim import passed_arguments

        keys = passed_arguments(builder, keys, note=False)
    runtime = {
        "model": {"quant": None, "seed": 0},
        "dataset": {"tokenizer": None, "max_length": 1, "packing": False, "seed": 0, "cache_dir": None},
        "trainer": {"output_dir": "x"},
        "optim": {"params": []},
    }
    inspect.signature(builder).bind(**keys, **runtime.get(group, {}))


def test_cheap_builders_instantiate():
    """quant, lora, optim and trainer really instantiate (no weights involved)."""
    import torch
    from hydra.utils import instantiate
    from peft import LoraConfig
    from transformers import TrainingArguments

    from fine_tune.training.optim import build_optimizer_factory

    for option in options("quant"):
        spec = instantiate(compose([f"quant={option}"]).quant)
        assert spec.kind == compose([f"quant={option}"]).quant.kind
    for option in options("lora"):
        spec = instantiate(compose([f"lora={option}"]).lora)
        assert isinstance(spec.lora, LoraConfig)
        assert spec.lora.r == 16
    param = torch.nn.Parameter(torch.zeros(4))
    for option in options("optim"):
        optimizer = build_optimizer_factory(compose([f"optim={option}"]).optim.optimizer)([param])
        assert optimizer.param_groups[0]["lr"] == pytest.approx(compose().model.lr)
    for option in options("trainer"):
        cfg = compose([f"trainer={option}"])
        args = instantiate(
            cfg.trainer, output_dir="/tmp/x", optim=OmegaConf.to_container(cfg.optim, resolve=True)
        )
        assert isinstance(args, TrainingArguments)
        assert args.learning_rate == pytest.approx(cfg.optim.lr)


def test_real_model_options_name_real_checkpoints():
    for option, name in [
        ("mistral_7b", "mistralai/Mistral-7B-v0.1"),
        ("mixtral", "mistralai/Mixtral-8x7B-v0.1"),
        ("mixtral_8x7b_instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
    ]:
        cfg = compose([f"model={option}"])
        assert cfg.model.name_or_path == name
        assert cfg.model.init == "pretrained"


def test_real_shapes_build_without_weights():
    """The architecture nodes give the published parameter counts (7.24B, 46.7B) with no hub access."""
    from fine_tune.models.architecture import load_architecture, parameter_count

    for option, expected in [("mistral_7b", 7.24e9), ("mixtral", 46.7e9)]:
        node = compose([f"model={option}", "model.init=random"]).model
        config = load_architecture(node.family, node.name_or_path, node.init, node.architecture, node.config)
        assert parameter_count(config) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose(name: str):
    cfg = compose([f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=False)
    assert cfg.task_name == name
