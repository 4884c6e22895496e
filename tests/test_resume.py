"""Checkpoints are whole or absent; SIGTERM stops cleanly; resume reproduces the uninterrupted run."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
from helpers import (
    TINY,
    cli,
    compose,
    logged,
    popen,
    read_jsonl,
    status,
    step_losses,
    stopped_copy,
    tiny_run,
    trained_run,
)

from fine_tune.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fine_tune.errors import UserError
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
    names = ["trainer_state.json", "optimizer.pt", ADAPTER_WEIGHTS]
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

    shutil.rmtree(tmp_path / "checkpoints")  # no complete checkpoint left: a fresh start keeps no rows
    assert prepare_resume(True, tmp_path) == (None, [])
    assert read_jsonl(tmp_path / "metrics.jsonl") == [] and read_jsonl(tmp_path / "samples.jsonl") == []


@pytest.mark.subprocess
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


@pytest.mark.subprocess
def test_ctrl_c_mid_training_then_resume_gives_the_same_losses(tmp_path: Path):
    reference = step_losses(tiny_run())
    assert [s for s, _, _ in reference] == list(range(1, 9))

    args = [*TINY, f"hydra.run.dir={tmp_path}"]
    process = popen(args)
    deadline = time.monotonic() + 300
    while not any(r.get("step", 0) >= 4 for r in read_jsonl(tmp_path / "metrics.jsonl")):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 4"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGINT, output[-3000:]
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


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR2], ids=lambda s: s.name)
def test_a_signal_stops_the_run_with_128_plus_its_number(signum, tmp_path: Path):
    process = popen([*TINY, f"hydra.run.dir={tmp_path}"])
    seen = ""
    while "data report" not in seen:  # logged once the handlers are installed
        line = process.stdout.readline()
        assert line, seen[-3000:]
        seen += line
    process.send_signal(signum)
    output = seen + process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signum, output[-3000:]
    assert status(tmp_path) == "preempted"
    assert "Traceback" not in output and f"hydra.run.dir={tmp_path}" in output  # how to continue


# A constant learning rate, so that a step trained past the end changes the adapter (a decaying
# schedule reaches 0 there and would hide it). The loss is logged at steps 1, 3 and 6 and
# checkpoints are written at 4 and 8: the one at 4 falls inside a logging window.
CONSTANT = (*TINY, "optim.scheduler=constant", "trainer.logging_steps=3", "trainer.save_steps=4")


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / ADAPTER_WEIGHTS)


def assert_same_adapter(run_dir: Path, reference: Path) -> None:
    import torch

    got, expected = adapter_tensors(run_dir), adapter_tensors(reference)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.subprocess
@pytest.mark.slow
def test_resume_at_the_last_checkpoint_trains_no_step_past_the_end(tmp_path: Path):
    """Killed while saving the final adapter (or preempted after the last checkpoint): checkpoint-8
    of 8 and no adapter. Resume finishes from the checkpoint's weights without training."""
    reference = trained_run("constant", CONSTANT)
    run = stopped_copy(reference, tmp_path / "run")
    partials = killed_during_save(run / "adapter")
    result = cli(["resume=true", f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert logged(run) == logged(reference)  # no step 9; the final eval as uninterrupted
    assert_same_adapter(run, reference)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8 and status(run) == "finished"
    assert partials and not any(p.exists() for p in partials)
    assert f"run directory: {run}" in result.stdout and f"everything is in {run}" in result.stdout


@pytest.mark.subprocess
@pytest.mark.slow
def test_resume_inside_a_logging_window_logs_what_the_uninterrupted_run_logged(tmp_path: Path):
    reference = trained_run("constant", CONSTANT)
    run = stopped_copy(reference, tmp_path / "run", last_checkpoint=4)
    record = snapshot(run / ".hydra")
    result = cli(["resume=true", f"hydra.run.dir={run}"])  # the run's own overrides are re-applied
    assert result.returncode == 0, result.stderr[-3000:]
    rows = logged(run)
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 3, 6]
    assert rows == logged(reference)  # the loss at 6 is the mean over steps 4-6, step 4 included
    assert_same_adapter(run, reference)
    assert snapshot(run / ".hydra") == record  # how the run was started stays recorded


@pytest.mark.subprocess
@pytest.mark.slow
def test_kill_during_the_first_checkpoint_save_starts_fresh_without_duplicate_rows(tmp_path: Path):
    reference = trained_run("constant", CONSTANT)
    run = stopped_copy(reference, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints" / STAGING / "checkpoint-4").mkdir(parents=True)  # the save it was killed in
    result = cli(["resume=true", f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert logged(run) == logged(reference)  # steps 1-8 once each, not the killed attempt's rows too
    assert sorted({r["step"] for r in read_jsonl(run / "samples.jsonl")}) == [4, 8]
    assert_same_adapter(run, reference)


@pytest.mark.subprocess
def test_resume_of_a_finished_run_changes_nothing(tmp_path: Path):
    run = shutil.copytree(tiny_run(), tmp_path / "run")
    before = snapshot(run)
    for args in (["resume=true"], [*TINY, "resume=true"]):  # the bare resume, and the full command
        result = cli([*args, f"hydra.run.dir={run}"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{run} finished earlier" in result.stdout
        assert snapshot(run) == before  # no step, no log line, no .hydra/ rewrite, no tracker run


@pytest.mark.subprocess
def test_resume_refuses_a_config_the_run_was_not_started_with(tmp_path: Path):
    run = stopped_copy(tiny_run(), tmp_path / "run", last_checkpoint=6)
    before = snapshot(run)
    result = cli(["resume=true", "trainer.max_steps=10", f"hydra.run.dir={run}"])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "trainer.max_steps: 8 -> 10" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(run) == before


@pytest.mark.subprocess
def test_a_new_run_does_not_overwrite_one_in_the_same_directory(tmp_path: Path):
    run = stopped_copy(tiny_run(), tmp_path / "run", last_checkpoint=6)
    before = snapshot(run)
    result = cli([*TINY, f"hydra.run.dir={run}"])
    assert result.returncode == 2 and "resume=true" in result.stderr, result.stderr[-2000:]
    assert snapshot(run) == before


def killed_during_save(target: Path, replacing: bool = False) -> list[Path]:
    """Leftovers of a process SIGKILLed inside `publish_dir(target, ...)` (how the run saves its
    adapter and tokenizer), made by the real helper rather than imitated: killed while writing the
    new copy, or (`replacing`) while deleting the `target` it replaces."""
    import subprocess
    import sys

    from helpers import ROOT, child_env

    killed = (
        "import os, shutil, signal, sys\n"
        "from fine_tune.utils.io import publish_dir\n"
        "def kill(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "def save(directory):\n"
        "    (directory / 'adapter_model.safetensors').write_text('half')\n"
        "    if sys.argv[2] == 'replacing':\n"
        "        shutil.rmtree = kill  # the old copy's deletion is where this process dies\n"
        "    else:\n"
        "        kill()\n"
        "publish_dir(sys.argv[1], save)\n"
    )
    if replacing:
        target.mkdir(parents=True)
        (target / ADAPTER_WEIGHTS).write_text("old")
    before = set(target.parent.iterdir()) if target.parent.is_dir() else set()
    result = subprocess.run(
        [sys.executable, "-c", killed, str(target), "replacing" if replacing else "writing"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert not target.exists()
    return sorted(set(target.parent.iterdir()) - before)


@pytest.mark.subprocess
@pytest.mark.parametrize("replacing", [False, True], ids=["writing", "replacing"])
def test_a_kill_during_an_atomic_save_leaves_a_partial_save_the_next_start_removes(replacing, tmp_path: Path):
    from fine_tune.run import remove_partial_saves

    leftovers = killed_during_save(tmp_path / "adapter", replacing)
    assert len(leftovers) == 1 + replacing  # the new copy (and the old one being deleted)
    assert all(p.name.startswith(".") for p in leftovers)  # hidden, never under the save's name
    (tmp_path / "adapter").mkdir()  # a finished save of the same run is kept
    remove_partial_saves(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_preemption_signal_is_deferred_then_forwarded_to_the_previous_handler():
    """SIGUSR2 (SLURM via submitit) only raises a flag during training; after the checkpoint the
    handler that was installed before (submitit's requeue) gets it. The signal handler logs nothing
    (it may interrupt a write to the log file: a reentrant write raises); the step end does."""
    import logging
    import os
    from types import SimpleNamespace

    from fine_tune.training.preemption import Preempted, PreemptionHandler

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    records = Records()
    logger = logging.getLogger("fine_tune")
    logger.addHandler(records)
    received = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        with PreemptionHandler() as handler:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            assert handler.requested and received == []  # deferred: training goes on to the step end
            assert records.messages == []
            control = handler.on_step_end(None, SimpleNamespace(global_step=3), SimpleNamespace())
            assert control.should_save and control.should_training_stop
            assert records.messages == ["SIGUSR2 received: saving a checkpoint at step 3, then stopping"]
            error = Preempted(handler.signum, "ckpt", handler.previous_handler)
        assert signal.getsignal(signal.SIGUSR2) is not handler._handle  # restored on exit
        error.forward_signal()
        assert received == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)
        logger.removeHandler(records)


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
    (checkpoint / ADAPTER_CONFIG).write_text(
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


def test_a_run_from_before_the_method_group_resumes_with_its_defaults():
    """Keys fine_tune gained since a run was written (the method group, init_adapter) are not
    differences when they hold their defaults; any other change still is."""
    from omegaconf import OmegaConf

    from fine_tune.resume_config import differences, with_new_keys

    current = OmegaConf.to_container(compose(TINY), resolve=False)
    saved = {k: v for k, v in current.items() if k not in ("method", "init_adapter")}
    assert differences(with_new_keys(saved), current) == []
    dpo = OmegaConf.to_container(compose([*TINY, "method=dpo"]), resolve=False)
    assert differences(with_new_keys(dict(saved)), dpo)[0].startswith("method.")
