"""Export: the merged model loads with plain transformers and matches base + adapter; the adapter
alone loads with plain PEFT; both carry a model card; nothing half-written is left behind. Mixtral's
expert adapters too: the exports are loaded in a process that never imports fine_tune.

The exports run through the tool's main in this process (`run_tool`), and the short runs they read
are trained here too (`train_here`): the claims are about what is written. The command line runs
once, end to end, in the push test (it exports, then refuses to push: exit 2, no traceback)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from helpers import cli, run_tool, tiny_run, train_here
from plain_load import in_plain_process as plain_load

from fine_tune.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fine_tune.export import UNQUANTIZED
from fine_tune.utils.io import umask

PROMPTS = ["<s> [INST] Convert 35000 grams to kilograms. [/INST]", "The capital of France is"]


def train_briefly(run: Path, *overrides: str) -> Path:
    """A 2-step run: enough for an adapter that differs from its initialisation."""
    brief = ["logger=none", "trainer.max_steps=2", "trainer.eval_steps=2"]
    data = ["dataset.max_samples=8", "dataset.max_eval_samples=2"]
    train_here(run, [*brief, *data, *overrides])
    return run


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.fixture(scope="module")
def trained():
    from fine_tune.inference import load_run

    run = tiny_run()
    loaded = load_run(run)
    return run, loaded, logits(loaded.model, loaded.tokenizer)


@pytest.mark.subprocess
def test_merged_model_loads_with_plain_transformers(trained, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, loaded, expected = trained
    out = tmp_path / "merged"
    run_tool("fine_tune.export", [f"run={run}", "merge=true", "dtype=float32", f"out={out}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp dir left next to it
    assert not (out / ADAPTER_CONFIG).exists()  # a full model, no PEFT needed
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "lora" not in " ".join(name for name, _ in model.named_parameters())
    got = logits(model, tokenizer)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # ...and the adapter mattered: the base alone differs.
    base = loaded.model.get_base_model()
    with loaded.model.disable_adapter():
        plain = logits(base, loaded.tokenizer)
    assert (plain - expected).abs().max() > 1e-3
    card = (out / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert "library_name: transformers" in card and f"| eval_loss | {metrics['eval_loss']:.4f} |" in card
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()  # not mkdtemp's 0700


@pytest.mark.subprocess
def test_adapter_export_loads_with_plain_peft(trained, tmp_path: Path):
    from peft import PeftModel

    from fine_tune.utils.build import build

    run, loaded, expected = trained
    out = tmp_path / "adapter"
    run_tool("fine_tune.export", [f"run={run}", f"out={out}"])
    assert (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file()
    base = build(loaded.cfg.model, quant=loaded.cfg.quant, seed=loaded.cfg.seed).model
    model = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits(model, loaded.tokenizer), expected, atol=1e-6, rtol=1e-6)
    card = (out / "README.md").read_text()
    for needle in (
        "library_name: peft",
        "random-init mistral",
        "sample",
        "mistral_v1",
        "train_loss",
        "r=16",
        "```yaml",
    ):
        assert needle in card, needle


@pytest.mark.subprocess
def test_push_without_a_token_is_a_user_error(trained, tmp_path: Path):
    run, _, _ = trained
    result = cli(
        [f"run={run}", f"out={tmp_path / 'a'}", "push_to_hub=someone/some-adapter"],
        module="fine_tune.export",
        env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    assert "push_to_hub" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "a" / ADAPTER_CONFIG).is_file()  # the export itself ran and finished


def test_qlora_run_merges_into_the_unquantized_base(tmp_path: Path):
    """A 4-bit run exports a plain full-precision model: LoRA folded into the base's real weights."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from fine_tune.inference import load_run

    run = train_briefly(tmp_path / "run", "trainer=cpu", "quant=nf4", "trainer.per_device_train_batch_size=2")
    out = tmp_path / "merged"
    run_tool("fine_tune.export", [f"run={run}", "merge=true", "dtype=float32", f"out={out}"])
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = load_run(run, quant=OmegaConf.create(UNQUANTIZED), dtype="float32")
    expected = logits(reference.model, reference.tokenizer)
    torch.testing.assert_close(logits(merged, reference.tokenizer), expected, atol=1e-4, rtol=1e-4)


# ---- Mixtral with LoRA on attention and experts: everything loads without fine_tune ------------------
@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny Mixtral QLoRA run (4-bit attention and experts, LoRA on both), fine_tune's model of it
    as trained, and its logits on PROMPTS: what every export below must reproduce."""
    from fine_tune.inference import load_run

    root = tmp_path_factory.mktemp("mixtral")
    run = train_briefly(root / "run", "experiment=tiny_mixtral_qlora", "trainer.save_steps=2")
    loaded = load_run(run)
    inputs = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.save(dict(inputs), root / "inputs.pt")
    return run, loaded, root / "inputs.pt", logits(loaded.model, loaded.tokenizer)


@pytest.mark.subprocess
@pytest.mark.slow
def test_mixtral_adapter_loads_whole_in_plain_peft(mixtral, tmp_path: Path):
    """Plain PEFT on the unquantized base loads every trained number, experts included, and computes
    fine_tune's model: the base is the run's 4-bit weights dequantized, so both sides share it."""
    from fine_tune.inference import recipe_of
    from fine_tune.models.moe import dequantize_model

    run, loaded, inputs, expected = mixtral
    out = tmp_path / "adapter"
    run_tool("fine_tune.export", [f"run={run}", f"out={out}"])
    assert sorted(p.name for p in out.glob("*adapter*")) == [
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
    ]
    from safetensors.torch import load_file

    exported, own = (load_file(str(d / ADAPTER_WEIGHTS)) for d in (out, run / "adapter"))
    assert exported.keys() == own.keys() and all(torch.equal(exported[k], own[k]) for k in own)
    same_config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert same_config == json.loads((run / "adapter" / ADAPTER_CONFIG).read_text())  # adapter/ too
    base = tmp_path / "base"
    dequantize_model(recipe_of(loaded.cfg).base.model, torch.float32).save_pretrained(base)

    report, got = plain_load(base, out, inputs)
    trained = json.loads((run / "metrics.json").read_text())["trainable_params"]
    assert report["adapter_numbers"] == report["file_numbers"] == trained  # 79,872: none dropped
    assert report["same_keys"] and report["same_values"]
    assert not [w for w in report["warnings"] if "missing" in w.lower() or "unexpected" in w.lower()]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    card = (out / "README.md").read_text()
    for needle in ("PeftModel.from_pretrained(base,", "mlp.experts.gate_up_proj", f"{trained:,}"):
        assert needle in card, needle


@pytest.mark.subprocess
@pytest.mark.slow
def test_mixtral_merges_into_its_dequantized_weights(mixtral, tmp_path: Path):
    """merge=true base=dequantized: a plain transformers model that *is* the trained model."""
    run, _, inputs, expected = mixtral
    out = tmp_path / "merged"
    args = [f"run={run}", "merge=true", "base=dequantized", "dtype=float32", f"out={out}"]
    run_tool("fine_tune.export", args)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    report, got = plain_load(out, None, inputs)
    assert report["lora_names"] == 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.subprocess
@pytest.mark.slow
def test_mixtral_merges_into_its_original_weights(mixtral, tmp_path: Path):
    """merge=true (base=original): the unquantized checkpoint + attention and expert adapters."""
    from omegaconf import OmegaConf

    from fine_tune.inference import load_run

    run, loaded, inputs, trained = mixtral
    out = tmp_path / "merged"
    run_tool("fine_tune.export", [f"run={run}", "merge=true", "dtype=float32", f"out={out}"])
    report, got = plain_load(out, None, inputs)
    assert report["lora_names"] == 0
    reference = load_run(run, quant=OmegaConf.create(UNQUANTIZED), dtype="float32")
    assert not any(type(m).__name__ == "Experts4bit" for m in reference.model.modules())
    expected = logits(reference.model, reference.tokenizer)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with reference.model.disable_adapter():  # the adapters (experts among them) changed the model
        assert (logits(reference.model, reference.tokenizer) - expected).abs().max() > 1e-3
    assert (got - trained).abs().max() > 0  # a different base than the 4-bit one: not the same model
