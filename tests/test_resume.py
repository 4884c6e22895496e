"""Checkpoints are whole or absent; SIGTERM stops cleanly; resume reproduces the uninterrupted run."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from lifecycle_helpers import TINY, cli, popen, read_jsonl, status, step_losses, tiny_run

from fine_tune.errors import EXIT_PREEMPTED, UserError
from fine_tune.training.checkpoints import (
    STAGING,
    clean_leftovers,
    find_checkpoint,
    list_checkpoints,
    prepare_resume,
    rotate,
)


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    names = ["trainer_state.json", "optimizer.pt", "adapter_model.safetensors"]
    if complete:
        names.append("scheduler.pt")
    for name in names:
        (path / name).write_text("x")
    return path


def test_incomplete_and_staged_checkpoints_are_never_picked(tmp_path: Path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2)
    fake_checkpoint(root, 10)
    fake_checkpoint(root, 12, complete=False)  # killed mid-save under the old, in-place scheme
    (root / STAGING / "checkpoint-14").mkdir(parents=True)
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-2", "checkpoint-10"]  # by step, not name
    assert find_checkpoint(True, tmp_path).name == "checkpoint-10"
    clean_leftovers(root)
    assert not (root / STAGING).exists()
    with pytest.raises(UserError, match="incomplete"):
        find_checkpoint(str(root / "checkpoint-12"), tmp_path)
    with pytest.raises(UserError) as error:
        find_checkpoint(str(tmp_path / "nope"), tmp_path)
    assert error.value.where == "resume"
    assert find_checkpoint(False, tmp_path) is None
    assert find_checkpoint(str(tmp_path), tmp_path).name == "checkpoint-10"  # a run dir: its latest


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path: Path):
    for step in (3, 6, 9, 12):
        fake_checkpoint(tmp_path, step)
    rotate(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-9"]


def test_resume_trims_logs_written_after_the_checkpoint(tmp_path: Path):
    fake_checkpoint(tmp_path / "checkpoints", 3)
    rows = [{"step": s, "train/loss": float(s)} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "tr')
    (tmp_path / "samples.jsonl").write_text(json.dumps({"step": 2}) + "\n" + json.dumps({"step": 4}) + "\n")
    checkpoint, kept = prepare_resume(True, tmp_path)
    assert checkpoint.name == "checkpoint-3"
    assert [r["step"] for r in kept] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [2]


def test_uninterrupted_run_keeps_the_last_k_whole_checkpoints():
    run = tiny_run()
    root = run / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-6", "checkpoint-8"]  # no staging left
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (root / "checkpoint-8" / name).is_file()
    samples = read_jsonl(run / "samples.jsonl")
    assert sorted({r["step"] for r in samples}) == [4, 8]
    assert all(r["completion"] is not None and r["prompt"].startswith("<s> [INST]") for r in samples)


def test_sigterm_mid_training_then_resume_gives_the_same_losses(tmp_path: Path):
    reference = step_losses(tiny_run())
    assert [s for s, _, _ in reference] == list(range(1, 9))

    args = [*TINY, f"hydra.run.dir={tmp_path}"]
    process = popen(args)
    deadline = time.monotonic() + 300
    while not any(r.get("step", 0) >= 4 for r in read_jsonl(tmp_path / "metrics.jsonl")):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 4"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "Traceback" not in output
    assert status(tmp_path) == "preempted"
    saved = list_checkpoints(tmp_path / "checkpoints")
    assert saved and 4 <= int(saved[-1].name.split("-")[1]) < 8  # saved at the step boundary it reached
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "adapter").exists()

    result = cli([*args, "resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert status(tmp_path) == "finished"
    assert step_losses(tmp_path) == reference  # every step, bit for bit, and no step logged twice
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["first_train_loss"] == reference[0][1] and metrics["steps"] == 8


def test_preemption_signal_is_deferred_then_forwarded_to_the_previous_handler():
    """SIGUSR2 (SLURM via submitit) only raises a flag during training; after the checkpoint the
    handler that was installed before (submitit's requeue) gets it."""
    import os

    from fine_tune.training.preemption import Preempted, PreemptionHandler

    received = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        with PreemptionHandler() as handler:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            assert handler.requested and received == []  # deferred: training goes on to the step end
            control = handler.on_step_end(None, None, type("C", (), {})())
            assert control.should_save and control.should_training_stop
            error = Preempted(handler.signum, "ckpt", handler.previous_handler)
        assert signal.getsignal(signal.SIGUSR2) is not handler._handle  # restored on exit
        error.forward_signal()
        assert received == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)


@pytest.mark.parametrize(
    ("lora", "trainer", "where"),
    [
        (
            {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj"]},
            {"per_device_train_batch_size": 2},
            "lora.r",
        ),
        (
            {"r": 16, "lora_alpha": 32, "target_modules": ["v_proj"]},
            {"per_device_train_batch_size": 2},
            "lora.target_modules",
        ),
        (
            {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]},
            {"per_device_train_batch_size": 4},
            "trainer.per_device_train_batch_size",
        ),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_shape_before_touching_the_logs(
    lora, trainer, where, tmp_path
):
    checkpoint = fake_checkpoint(tmp_path / "checkpoints", 3)
    (checkpoint / "adapter_config.json").write_text(
        json.dumps({"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]})
    )
    (checkpoint / "trainer_state.json").write_text(json.dumps({"train_batch_size": 2, "global_step": 3}))
    log = "".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(1, 6))
    (tmp_path / "metrics.jsonl").write_text(log)
    ok = ({"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}, {"per_device_train_batch_size": 2})
    with pytest.raises(UserError) as error:
        prepare_resume(True, tmp_path, lora, trainer)
    assert error.value.where == where
    assert (tmp_path / "metrics.jsonl").read_text() == log  # nothing trimmed for a refused resume
    assert prepare_resume(True, tmp_path, *ok)[0] == checkpoint
