"""Sweep bookkeeping: status files, job dir names, and the SweepCallback inside real Hydra multiruns.

The multirun tests use a toy task (no model) so they check the sweep machinery alone: failing jobs
do not stop the others, the summary reports them, a rerun skips finished jobs, and a sweep where
nothing finished exits non-zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT

from fine_tune import sweep

# --- status helpers --------------------------------------------------------------------------


def test_status_lifecycle_and_skip(tmp_path):
    run = tmp_path / "job"
    assert not sweep.should_skip(run) and sweep.read_status(run) is None
    sweep.mark_running(run, ["lora.r=4"])
    assert sweep.read_status(run)["status"] == "running" and not sweep.should_skip(run)
    sweep.mark_failed(run, RuntimeError("boom"))
    status = sweep.read_status(run)
    assert status["status"] == "failed" and status["error"] == "RuntimeError: boom" and status["ended"]
    assert not sweep.should_skip(run)  # failed jobs are rerun
    sweep.mark_running(run, ["lora.r=4"])
    assert sweep.read_status(run)["error"] is None
    sweep.mark_finished(run, 1.25)
    status = sweep.read_status(run)
    assert status["status"] == "finished" and status["metric"] == 1.25 and status["overrides"] == ["lora.r=4"]
    assert sweep.should_skip(run) and sweep.finished_metric(run) == 1.25
    assert sorted(p.name for p in run.iterdir()) == ["status.json"]  # no temp files left behind


def test_finished_metric_falls_back_to_metrics_json(tmp_path):
    sweep.mark_running(tmp_path, [])
    sweep.mark_finished(tmp_path, None)
    (tmp_path / "metrics.json").write_text(json.dumps({"eval_loss": 2.5}))
    assert sweep.finished_metric(tmp_path) == 2.5


def test_oom_is_its_own_status_and_errors_are_redacted(tmp_path):
    key = "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4"
    error = RuntimeError(f"CUDA out of memory. Tried to allocate 2 GiB (token {key})")
    assert sweep.is_oom(error) and not sweep.is_oom(ValueError("bad value"))
    sweep.mark_failed(tmp_path, error, oom=sweep.is_oom(error))
    status = sweep.read_status(tmp_path)
    assert status["status"] == "oom" and key not in (tmp_path / "status.json").read_text()


def test_job_subdir_is_deterministic_and_filesystem_safe():
    assert sweep.job_subdir("lora.r=4,optim=adamw_torch", 3) == "lora.r=4,optim=adamw_torch"
    assert sweep.job_subdir("", 3) == "job3"
    assert "/" not in sweep.job_subdir("dataset.path=/data/x.jsonl,lora.r=4", 0)
    long_a, long_b = "x=" + "a" * 400, "x=" + "a" * 399 + "b"
    assert len(sweep.job_subdir(long_a, 0).encode()) <= 200
    assert sweep.job_subdir(long_a, 0) != sweep.job_subdir(long_b, 0)
    assert sweep.job_subdir(long_a, 0) == sweep.job_subdir(long_a, 7)


# --- inside Hydra multiruns (toy task) -------------------------------------------------------

TOY_APP = """
import json, sys
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig
from fine_tune import sweep

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with open(Path(cfg.log_file), "a") as log:
        log.write(f"{cfg.x}\\n")
    if sweep.should_skip(run_dir):
        return sweep.finished_metric(run_dir)
    sweep.mark_running(run_dir, list(HydraConfig.get().overrides.task))
    if cfg.x == "bad":
        raise ValueError("deliberate failure")
    if cfg.x == "oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
    loss = float(cfg.x) / 10
    (run_dir / "metrics.json").write_text(json.dumps({"eval_loss": loss, "train_loss": loss + 1}))
    sweep.mark_finished(run_dir, loss)
    return loss

if __name__ == "__main__":
    main()
"""

TOY_CONFIG = """
x: 1
log_file: ???
hydra:
  sweep:
    dir: ???
    subdir: ${fine_tune.job_subdir:${hydra.job.override_dirname},${hydra.job.num}}
  job:
    config:
      override_dirname:
        exclude_keys: [log_file]
  callbacks:
    sweep:
      _target_: fine_tune.sweep.SweepCallback
"""


@pytest.fixture
def toy_app(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(TOY_CONFIG)
    (tmp_path / "app.py").write_text(textwrap.dedent(TOY_APP))
    sweep_dir = tmp_path / "sweep"
    log_file = tmp_path / "calls.txt"

    def run(*overrides: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        args = [sys.executable, str(tmp_path / "app.py"), "-m", *overrides]
        args += [f"hydra.sweep.dir={sweep_dir}", f"log_file={log_file}"]
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    return run, sweep_dir, log_file


@pytest.mark.subprocess
def test_failing_jobs_do_not_stop_the_sweep_and_a_rerun_skips_finished(toy_app):
    run, sweep_dir, log_file = toy_app
    first = run("x=1,bad,3,oom")
    assert first.returncode == 0, first.stderr
    assert log_file.read_text().split() == ["1", "bad", "3", "oom"]  # every job ran
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    by_job = {row["job"]: row for row in summary["jobs"]}
    assert {j: r["status"] for j, r in by_job.items()} == {
        "x=1": "finished",
        "x=3": "finished",
        "x=bad": "failed",
        "x=oom": "oom",
    }
    assert by_job["x=1"]["eval_loss"] == 0.1 and by_job["x=3"]["eval_loss"] == pytest.approx(0.3)
    assert "deliberate failure" in by_job["x=bad"]["error"]
    assert summary["jobs"][0]["job"] == "x=1"  # best finished job first
    table = first.stdout + first.stderr
    assert "2 finished" in table and "1 failed" in table and "1 oom" in table and "x=bad" in table
    assert (sweep_dir / "sweep_summary.md").read_text().count("| x=") == 4

    second = run("x=1,bad,3,oom")  # same sweep dir: finished jobs are found and skipped
    assert second.returncode == 0, second.stderr
    statuses = {
        d.name: json.loads((d / "status.json").read_text())["status"]
        for d in sweep_dir.iterdir()
        if d.is_dir()
    }
    assert statuses == {"x=1": "finished", "x=3": "finished", "x=bad": "failed", "x=oom": "oom"}
    mtimes = {n: (sweep_dir / n / "metrics.json").stat().st_mtime_ns for n in ("x=1", "x=3")}
    third = run("x=1,3,5")
    assert third.returncode == 0
    assert {n: (sweep_dir / n / "metrics.json").stat().st_mtime_ns for n in ("x=1", "x=3")} == mtimes
    assert (sweep_dir / "x=5" / "metrics.json").is_file()


@pytest.mark.subprocess
def test_sweep_where_nothing_finished_exits_nonzero(toy_app):
    run, sweep_dir, _ = toy_app
    result = run("x=bad,oom")
    assert result.returncode != 0
    assert "no job of the sweep finished" in result.stderr
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert sorted(r["status"] for r in summary["jobs"]) == ["failed", "oom"]


@pytest.mark.subprocess
def test_optuna_sweeper_records_failed_trials_and_goes_on(toy_app, tmp_path):
    """With Optuna the callback leaves failures to the sweeper (a failed trial, not a fake value)."""
    run, sweep_dir, log_file = toy_app
    result = run(
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra.sweeper.sampler.seed=3",
        "x=choice(1,2,bad)",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    calls = log_file.read_text().split()
    assert len(calls) == 6 and "bad" in calls and {"1", "2"} & set(calls)
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["counts"]["failed"] == 1 and summary["counts"]["finished"] >= 1
    assert summary["optuna"]["best_params"]["x"] in (1, 2)
