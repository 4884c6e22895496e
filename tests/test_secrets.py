"""Tokens in the environment never reach a file of the run dir, W&B's offline files or the logs;
tokens in a config are refused; models never run remote code unless asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT, TINY, cli, compose, status

from fine_tune.errors import UserError
from fine_tune.secrets import check_no_secrets, find_secret

HF = "hf_" + "Xk3Lm9" * 6
WANDB = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"  # 40 hex digits, the classic W&B key shape
OTHER = "odd-shaped-secret-value-123"


def files_containing(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {n[:6]}..." for n in needles if n.encode() in data]
    return found


@pytest.mark.subprocess
def test_environment_tokens_never_reach_run_files_or_wandb(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = [*TINY, "logger=wandb", "logger.mode=offline", "trainer.max_steps=4", f"hydra.run.dir={run_dir}"]
    env = {"HF_TOKEN": HF, "WANDB_API_KEY": WANDB, "MY_SERVICE_TOKEN": OTHER, "WANDB_MODE": "offline"}
    result = cli(args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert status(run_dir) == "finished"
    wandb_files = list((run_dir / "wandb").rglob("*.wandb"))
    assert wandb_files, "the W&B offline run was not written where expected"
    assert files_containing(run_dir, [HF, WANDB, OTHER]) == []
    for needle in (HF, WANDB, OTHER):
        assert needle not in result.stdout + result.stderr


@pytest.mark.subprocess
def test_a_token_in_the_config_is_refused_and_scrubbed(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # an existing directory is kept (a new one would be removed: nothing was trained)
    result = cli(["logger=none", f"+wandb_api_key={WANDB}", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2
    assert "wandb_api_key" in result.stderr and WANDB not in result.stdout + result.stderr
    assert (run_dir / ".hydra").is_dir()  # Hydra saved it before we ran: it must have been scrubbed
    assert files_containing(run_dir, [WANDB]) == []


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"logger": {"api_key": "abc12345"}}, "logger.api_key"),
        ({"model": {"name_or_path": f"https://user:{HF}@example.com/x"}}, "model.name_or_path"),
        ({"dataset": {"path": ["a.jsonl", f"{HF}.jsonl"]}}, "dataset.path"),
        ({"model": {"tokenizer": "mistral_v1", "pad_token": "<unk>", "revision": "a" * 40}}, None),
    ],
)
def test_find_secret(data, key):
    assert find_secret(data) == key
    if key:
        with pytest.raises(UserError) as error:
            check_no_secrets(data)
        assert error.value.where == key and HF not in str(error.value)


@pytest.mark.parametrize("model", sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")))
def test_remote_code_is_off_in_every_model_preset(model):
    overrides = [f"model={model}"] + (["model.name_or_path=/x"] if model == "local" else [])
    assert compose(overrides).model.trust_remote_code is False


def test_a_tokenizer_path_in_the_environment_is_not_a_credential(monkeypatch):
    """A launcher script exporting TOKENIZER=<dir> and passing model.tokenizer=<dir> is not leaking a
    token (the device's multi-GPU run was refused for exactly that); HF_TOKEN's value still is."""
    path = "/work/main/.bench_data/tokenizer_mistral_v1"
    monkeypatch.setenv("TOKENIZER", path)
    assert find_secret({"model": {"tokenizer": path}}) is None
    monkeypatch.setenv("HF_TOKEN", "an-odd-shaped-token-value")
    assert find_secret({"model": {"tokenizer": "an-odd-shaped-token-value"}}) == "model.tokenizer"
