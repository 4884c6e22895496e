"""Resuming a Mixtral QLoRA run restores the expert adapters too (HF's resume loads PEFT's modules
only and skips the expert tensors of the checkpoint): the resumed losses equal the uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli, stopped_copy
from safetensors import safe_open

from fine_tune.adapters import ADAPTER_WEIGHTS

ARGS = [
    "experiment=tiny_mixtral_qlora",
    "logger=none",
    "trainer.save_steps=4",
    "trainer.eval_steps=4",
    "trainer.logging_steps=1",
    "dataset.max_samples=64",
]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]


@pytest.mark.subprocess
def test_resume_restores_expert_adapters(tmp_path: Path):
    full = cli([*ARGS, "trainer.max_steps=8", f"hydra.run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-2000:]
    part = stopped_copy(tmp_path / "full", tmp_path / "part", last_checkpoint=4)
    checkpoint = part / "checkpoints" / "checkpoint-4"
    with safe_open(str(checkpoint / ADAPTER_WEIGHTS), "pt") as saved:  # PEFT's format
        assert any(".mlp.experts." in key for key in saved.keys())  # noqa: SIM118
    resumed = cli(["resume=true", f"hydra.run.dir={part}"])  # the run's own overrides are re-applied
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = train_losses(tmp_path / "full")
    assert [step for step, _ in expected] == list(range(1, 9))
    assert train_losses(part) == expected
