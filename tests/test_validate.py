"""validate=true: targets and cross-checks fail fast with the key named, the analytic parameter
counts match the real model, and the dry run writes nothing a finished run would."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import FIXTURES, cli, compose

from fine_tune.errors import UserError
from fine_tune.families.shapes import experts_in_4bit, model_shapes, parameter_counts
from fine_tune.validate import check_config, check_prompts


def real_counts(cfg) -> tuple[int, int]:
    """(trainable, total of the base model) as the run builds them."""
    from fine_tune.adapters import count_parameters
    from fine_tune.recipe import Recipe

    recipe = Recipe(cfg)
    _, base = count_parameters(recipe.base.model)
    trainable, _ = count_parameters(recipe.model)
    return trainable, base


def analytic_counts(cfg):
    """What validate=true and plan=true report, from the completed config."""
    from fine_tune.schema import complete

    data = complete(cfg)
    shapes = model_shapes(data["model"])
    return parameter_counts(shapes, data["lora"], experts_in_4bit(shapes, data["quant"]))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["lora=all_linear", "lora.r=4"],
        ["lora=attn_only", "lora.bias=lora_only"],
        ["model=tiny_mixtral", "lora=all_linear", "lora.lora_dropout=0"],
        ["model=tiny_mixtral", "lora=all_linear", "lora.lora_dropout=0", "lora.r=4"],
        ["model=tiny_mixtral", "quant=nf4", "lora=attn_experts", "lora.r=8"],
        ["model=tiny_mixtral", "quant=nf4", "lora=all_linear", "lora.lora_dropout=0"],
        ["model=tiny_qwen2_moe", "lora=all_linear", "lora.bias=all"],
        ["model=tiny_qwen2_moe", "quant=nf4", "lora=attn_experts", "lora.bias=lora_only"],
        ["model=tiny_qwen2_moe", "quant=nf4", "lora=default", "+model.architecture.mlp_only_layers=[0]"],
        ["lora=dora"],
        ["model=tiny_mixtral", "quant=nf4", "lora=dora", "optim=loraplus"],
        ["lora=pissa", "lora.r=4"],
        ["lora=loftq", "quant=nf4"],
    ],
    ids=[
        "mistral_default",
        "mistral_all_linear",
        "mistral_attn_bias",
        "mixtral_all_linear",
        "mixtral_r4",
        "mixtral_experts",
        "mixtral_nf4_all_linear",
        "qwen2_moe_all_linear_bias",
        "qwen2_moe_experts",
        "qwen2_moe_dense_layer",
        "dora",
        "mixtral_nf4_dora_loraplus",
        "pissa",
        "loftq",
    ],
)
def test_analytic_parameter_counts_match_the_built_model(overrides):
    """One count for validate and plan (all-linear on MoE and the LoRA variants included), equal to
    what PEFT builds."""
    from fine_tune.plan import plan_memory

    cfg = compose(["logger=none", *overrides])
    counts = analytic_counts(cfg)
    real_trainable, real_total = real_counts(cfg)
    assert counts.trainable == real_trainable == plan_memory(cfg).trainable_params
    assert counts.total == real_total


@pytest.mark.parametrize(
    ("overrides", "env", "where"),
    [
        (["model.attn_implementation=flash_attention_2"], {}, "model.attn_implementation"),
        (["model=tiny_mixtral", "quant=int8", "lora=attn_experts"], {}, "lora.experts"),  # never run: int8
        # accelerate's FSDP config under trainer.strategy=ddp (FSDP's own refusals: test_multigpu.py)
        (["optim=paged_adamw_8bit"], {"ACCELERATE_USE_FSDP": "true"}, "trainer.strategy"),
        (["+optim.optimizer.nesterov=true"], {}, "optim.optimizer.nesterov"),
        (["logger.project=x", "+logger.colour=red"], {}, "logger.colour"),
        (["optim.warmup_ratio=1.5"], {}, "optim.warmup_ratio"),
        (["model=tiny_mixtral", "lora=all_linear"], {}, "lora.lora_dropout"),  # PEFT refuses it late
        (["model=tiny_mixtral", "quant=nf4", "lora=all_linear"], {}, "lora.lora_dropout"),  # the router
        (["trainer.max_steps=-1", "trainer.num_train_epochs=0"], {}, "trainer.num_train_epochs"),
    ],
)
def test_cross_checks_name_the_key(overrides, env, where, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError) as error:
        check_config(compose(["logger=wandb", *overrides]))
    assert error.value.where == where


PAIRS = ["dataset=preference", f"dataset.path={FIXTURES / 'preference.jsonl'}"]


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        (["method=dpo"], "method"),  # the default instruction data
        (["method=sft", *PAIRS], "method"),
        (["method=orpo", *PAIRS, "dataset.packing=true"], "dataset.packing"),
        (
            ["method=dpo", *PAIRS, "dataset.max_length=64", "dataset.max_prompt_length=64"],
            "dataset.max_prompt_length",
        ),
        (["method=dpo", *PAIRS, "dataset.template=none"], "dataset.template"),
        (["method=dpo", *PAIRS, "dataset.format=alpaca"], "dataset.format"),
        (
            ["dataset=alpaca", f"dataset.path={FIXTURES / 'alpaca.jsonl'}", "+dataset.fields.answer=a"],
            "dataset.fields.answer",
        ),
    ],
    ids=[
        "dpo_on_sft_data",
        "sft_on_pairs",
        "packed_pairs",
        "no_room_for_answers",
        "pairs_as_raw_text",
        "sft_format_for_pairs",
        "field_of_another_format",
    ],
)
def test_validate_refuses_data_the_builder_or_method_cannot_take_before_loading(
    overrides, where, monkeypatch
):
    """The dataset's keys against each other, its builder and the method, from the config alone:
    validate=true reports them (as every run's `check_config` does) without loading the tokenizer."""
    from fine_tune import modes

    def loaded(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded")

    monkeypatch.setattr("fine_tune.models.tokenizer.build_tokenizer", loaded)
    with pytest.raises(UserError) as error:
        modes.dispatch(compose(["logger=none", "trainer=cpu", "validate=true", *overrides]))
    assert error.value.where == where


def test_notes_for_cpu_limits():
    checked = check_config(compose(["logger=none", "quant=nf4", "trainer.precision=bf16"]))
    text = " ".join(checked.notes)
    assert "quant=nf4 on CPU" in text and "bf16 requested on CPU" in text
    assert ("lora", "fine_tune.adapters.build_lora_config") in checked.targets


def test_prompt_longer_than_max_length_is_refused():
    bundle = SimpleNamespace(prompts=[{"prompt_ids": [1] * 10}, {"prompt_ids": [1] * 40}])
    check_prompts(bundle, 64)
    with pytest.raises(UserError) as error:
        check_prompts(bundle, 40)
    assert error.value.where == "dataset.max_length"


def test_a_run_refuses_a_long_prompt_as_validate_does_before_loading(tmp_path: Path, monkeypatch):
    """The sample's held-out prompts reach 41 tokens: a run stops at the data, with validate=true's
    error, before any weights load."""
    from fine_tune import modes
    from fine_tune.recipe import Recipe
    from fine_tune.run import train

    monkeypatch.setattr(Recipe, "base", property(lambda self: pytest.fail("weights were loaded")))
    overrides = ["trainer=cpu", "logger=none", "dataset.truncation=drop", "dataset.max_length=40"]
    with pytest.raises(UserError) as validated:
        modes.dispatch(compose([*overrides, "validate=true"]))
    with pytest.raises(UserError) as trained:
        train(compose(overrides), tmp_path, tracker=None, job={})
    assert str(trained.value) == str(validated.value)
    assert trained.value.where == "dataset.max_length" and "longest prompt" in str(trained.value)


@pytest.mark.subprocess
def test_validate_prints_the_plan_and_writes_no_run(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = cli(["validate=true", "trainer=cpu", "logger=none", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    trainable = analytic_counts(compose(["trainer=cpu", "logger=none"])).trainable
    for needle in (
        "validation passed",
        "checks:",
        f"trainable parameters: {trainable:,}",
        "data",
        "training: 20 steps",
        "memory",
        "held-out prompts",
    ):
        assert needle in out, needle
    assert not (run_dir / "status.json").exists() and not (run_dir / "metrics.json").exists()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "adapter").exists()


@pytest.mark.subprocess
def test_config_errors_are_found_before_torch_is_imported():
    """Bad values must fail in a second, not after torch/transformers load (a fresh interpreter)."""
    import subprocess
    import sys

    from helpers import ROOT, child_env

    script = (
        "import sys\n"
        "from helpers import compose\n"
        "from fine_tune.validate import check_config\n"
        "from fine_tune.errors import UserError\n"
        "for ov in (['lora.r=0'], ['trainer.precision=fp64'], ['+dataset.colour=1'], ['lora.experts=true'],\n"
        "           ['model.attn_implementation=magic'], ['dataset=alpaca', 'dataset.path=/nope.jsonl']):\n"
        "    try:\n"
        "        check_config(compose(['logger=none', *ov]))\n"
        "    except UserError as error:\n"
        "        print(error.where, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT / "tests",
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:-1] == [
        f"{key} False False"
        for key in (
            "lora.r",
            "trainer.precision",
            "dataset.colour",
            "lora.experts",
            "model.attn_implementation",
            "dataset.path",
        )
    ]
