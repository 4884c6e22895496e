"""Every option of every group composes, and every `_target_` it names exists and accepts the
option's keys, checked without loading any weights."""

from __future__ import annotations

import importlib
import inspect

import pytest
from helpers import CONF, checked, compose
from omegaconf import OmegaConf

from fine_tune.schema import GROUP_SCHEMAS, MOVED, default, schema_for

GROUPS = ["model", "quant", "lora", "dataset", "method", "optim", "trainer", "logger"]


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
    """Its `_target_`s import and take its keys (the arguments the run adds are left to the run)."""
    from fine_tune.validate import Checked, check_targets

    overrides = [f"{group}={option}"]
    if group == "model" and option == "local":
        overrides.append("model.name_or_path=/models/any")
    cfg = checked(overrides)  # as every run and validate=true do first (it also moves deprecated keys)
    node = OmegaConf.to_container(cfg[group], resolve=True)  # every interpolation resolves
    found = Checked()
    check_targets({group: node}, found)
    assert found.targets, f"conf/{group}/{option}.yaml has no _target_"


@pytest.mark.parametrize(("group", "option"), [o for o in all_options() if o[0] in GROUP_SCHEMAS])
def test_each_default_has_one_definition(group: str, option: str):
    """What the run reads is the schema's defaults under the option's values, and no builder's
    signature holds a default of its own for a key the schema owns."""
    from fine_tune.schema import check_types

    cfg = compose([f"{group}={option}"] + (["model.name_or_path=/m"] if option == "local" else []))
    composed = {k: v for k, v in OmegaConf.to_container(cfg[group]).items() if f"{group}.{k}" not in MOVED}
    check_types(cfg)
    schema, target = schema_for(group, cfg[group]), cfg[group].get("_target_")
    expected = OmegaConf.merge(OmegaConf.structured(schema), composed)
    assert OmegaConf.to_container(cfg[group]) == OmegaConf.to_container(expected)

    if target:
        for name, param in inspect.signature(locate(target)).parameters.items():
            if name in schema.__dataclass_fields__ and param.default is not inspect.Parameter.empty:
                owned, given = default(schema, name), param.default
                same = given == owned or (isinstance(given, tuple) and list(given) == owned)
                assert same or (given is None and not owned), (
                    f"{target}({name}={given!r}): schema says {owned!r}"
                )


@pytest.mark.parametrize("group", [g for g in GROUP_SCHEMAS if g != "model"])
def test_the_default_options_show_the_schema_defaults(group: str):
    """A value the default run's option (conf/config.yaml) shows is the schema's default, never a
    second one (eval_steps was 20 there, 100 in the schema). The model group's default, tiny_mistral,
    is a model of its own."""
    node = compose()[group]
    defaults = OmegaConf.to_container(OmegaConf.structured(schema_for(group, node)))
    shown = {k: v for k, v in OmegaConf.to_container(node).items() if defaults.get(k, "???") != "???"}
    assert shown == {k: v if isinstance(v, str) and "${" in v else defaults[k] for k, v in shown.items()}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            ["trainer.max_length=128", "trainer.packing=true"],
            ["dataset.max_length=128", "dataset.packing=true"],
        ),
        ([], ["dataset.max_length=512", "dataset.packing=false"]),
    ],
)
def test_max_length_and_packing_live_in_dataset(old, new, caplog):
    """`trainer.max_length`/`trainer.packing` still work for one release, with a warning."""
    from fine_tune.schema import check_types

    cfg, expected = compose(old), compose(new)
    with caplog.at_level("WARNING", logger="fine_tune"):
        check_types(cfg)
        check_types(expected)
    assert (cfg.dataset.max_length, cfg.dataset.packing) == (
        expected.dataset.max_length,
        expected.dataset.packing,
    )
    assert "max_length" not in cfg.trainer and "packing" not in cfg.trainer
    assert ("trainer.max_length is deprecated" in caplog.text) == bool(old)
    assert compose(["trainer=gpu"]).dataset.max_length == 2048  # the recipes set the data setting


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
        assert spec.skip_modules == (() if spec.kind == "none" else ("lm_head",))
    for option in options("lora"):
        spec = instantiate(compose([f"lora={option}"]).lora)
        assert isinstance(spec.lora, LoraConfig)
        assert spec.lora.r == 16
    param = torch.nn.Parameter(torch.zeros(4))
    for option in options("optim"):
        optimizer = build_optimizer_factory(compose([f"optim={option}"]).optim.optimizer)([param])
        assert optimizer.param_groups[0]["lr"] == pytest.approx(compose().model.lr)
    from fine_tune.recipe import Recipe

    for option in options("trainer"):
        cfg = checked([f"trainer={option}"])
        args = Recipe(cfg).arguments("/tmp/x", has_eval=True)
        assert isinstance(args, TrainingArguments)
        assert args.learning_rate == pytest.approx(cfg.optim.lr)


def test_real_model_options_name_real_checkpoints():
    for option, name in [
        ("qwen2_moe", "Qwen/Qwen1.5-MoE-A2.7B"),
        ("mistral_7b", "mistralai/Mistral-7B-v0.1"),
        ("mixtral", "mistralai/Mixtral-8x7B-v0.1"),
        ("mixtral_8x7b_instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
    ]:
        cfg = compose([f"model={option}"])
        assert cfg.model.name_or_path == name
        assert cfg.model.init == "pretrained"


def test_real_shapes_build_without_weights():
    """The architecture nodes give the published parameter counts (7.24B, 46.7B, 14.3B) with no hub
    access, and the planner reads the same shapes from the node."""
    from fine_tune.families.shapes import config_shapes, model_shapes, parameter_counts
    from fine_tune.models.architecture import load_architecture

    for option, expected in [("mistral_7b", 7.24e9), ("mixtral", 46.7e9), ("qwen2_moe", 14.3e9)]:
        cfg = checked([f"model={option}", "model.init=random"])
        node = cfg.model
        config = load_architecture(node.family, node.name_or_path, node.init, node.architecture, node.config)
        shapes = config_shapes(config)
        assert parameter_counts(shapes).total == pytest.approx(expected, rel=0.01)
        assert model_shapes(OmegaConf.to_container(node)) == shapes


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose(name: str):
    cfg = compose([f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=False)
    assert cfg.task_name == name
