"""Several processes on CPU (gloo): a torchrun job ends cleanly, in one run dir, with one summary; a
process that hangs after its job is turned into stack traces and an exit instead of blocking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FAST, ROOT, cli

from fine_tune.adapters import ADAPTER_CONFIG

TORCHRUN = ["--standalone", "--nproc_per_node", "2", "-m", "fine_tune"]
SHORT = [*FAST, "trainer.max_steps=4", "trainer.eval_steps=2", "trainer.save_steps=2"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_gloo_ranks_end_cleanly_in_one_run_dir(tmp_path: Path):
    """The hang this guards against was intermittent. One attempt here: every torchrun test of
    tests/test_multigpu.py (DDP, FSDP, a sweep, a stop) is another, which a hang fails by its timeout."""
    run_dir = tmp_path / "run"
    env = {
        "FINE_TUNE_RUN_DIR": str(run_dir),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    # cwd is the empty tmp dir: a rank that made its own run dir would show up there
    result = cli([*TORCHRUN, *SHORT], cwd=tmp_path, env=env, timeout=300, module="torch.distributed.run")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4
    assert (run_dir / "adapter" / ADAPTER_CONFIG).is_file()
    assert output.count("final: train loss") == 1  # rank 0 only
    assert "Timeout (0:" not in output  # the exit watchdog did not have to fire


@pytest.mark.subprocess
def test_exit_watchdog_turns_a_hang_after_the_job_into_stacks_and_an_exit():
    hang = (
        "import threading, time\n"
        "from fine_tune.distributed import exit_watchdog\n"
        "threading.Thread(target=time.sleep, args=(300,), name='stuck-teardown').start()\n"
        "exit_watchdog(1.0)\n"
    )
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", hang], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Timeout (0:00:01)!" in result.stderr and "time.sleep" not in result.stdout
    assert "Thread 0x" in result.stderr


@pytest.mark.subprocess
def test_exit_watchdog_stays_off_in_a_single_process():
    quick = (
        "from fine_tune.distributed import exit_watchdog\nexit_watchdog(0.01)\nimport time; time.sleep(0.5)\n"
    )
    env = {**os.environ, "WORLD_SIZE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", quick], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "Timeout" not in result.stderr
