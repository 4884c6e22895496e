"""Export: the merged model loads with plain transformers and matches base + adapter; the adapter
alone loads with plain PEFT; both carry a model card; nothing half-written is left behind."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from lifecycle_helpers import cli, tiny_run

from fine_tune.utils.io import umask

PROMPTS = ["<s> [INST] Convert 35000 grams to kilograms. [/INST]", "The capital of France is"]


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


def test_merged_model_loads_with_plain_transformers(trained, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, loaded, expected = trained
    out = tmp_path / "merged"
    result = cli([f"run={run}", "merge=true", "dtype=float32", f"out={out}"], module="fine_tune.export")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp dir left next to it
    assert not (out / "adapter_config.json").exists()  # a full model, no PEFT needed
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


def test_adapter_export_loads_with_plain_peft(trained, tmp_path: Path):
    from peft import PeftModel

    from fine_tune.utils.build import build

    run, loaded, expected = trained
    out = tmp_path / "adapter"
    result = cli([f"run={run}", f"out={out}"], module="fine_tune.export")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
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


def test_push_without_a_token_is_a_user_error(trained, tmp_path: Path):
    run, _, _ = trained
    result = cli(
        [f"run={run}", f"out={tmp_path / 'a'}", "push_to_hub=someone/some-adapter"],
        module="fine_tune.export",
        extra_env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    assert "push_to_hub" in result.stderr and "Traceback" not in result.stderr


def test_qlora_run_merges_into_the_unquantized_base(tmp_path: Path):
    """A 4-bit run exports a plain full-precision model: LoRA folded into the base's real weights."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from fine_tune.inference import load_run

    run = tmp_path / "run"
    args = [
        "logger=none",
        "trainer=cpu",
        "quant=nf4",
        "trainer.max_steps=2",
        "trainer.eval_steps=2",
        "trainer.per_device_train_batch_size=2",
        "dataset.max_samples=8",
        "dataset.max_eval_samples=2",
    ]
    result = cli([*args, f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "merged"
    result = cli([f"run={run}", "merge=true", "dtype=float32", f"out={out}"], module="fine_tune.export")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    plain = OmegaConf.create({"_target_": "fine_tune.models.quant.build_quant_config", "kind": "none"})
    reference = load_run(run, quant=plain, dtype="float32")
    expected = logits(reference.model, reference.tokenizer)
    torch.testing.assert_close(logits(merged, reference.tokenizer), expected, atol=1e-4, rtol=1e-4)
