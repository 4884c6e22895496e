"""End to end: real `python -m fine_tune -m ...` multiruns of the tiny model on CPU.

Each test is one or two subprocess sweeps with a few 2-step jobs (about 10 s per job on 2 cores).
The W&B runs are read back from their offline `.wandb` files, so what is checked is what would be
uploaded.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, cli

from fine_tune import compare
from fine_tune.tracking.wandb_offline import find_runs, read_run
from fine_tune.utils.format import format_metric

FAKE_WANDB_KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"
FAKE_HF_TOKEN = "hf_ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210"
TINY = [
    "trainer=cpu",
    "trainer.max_steps=2",
    "trainer.logging_steps=1",
    "dataset.max_eval_samples=8",
    "trainer.generation.num_prompts=1",
    "trainer.generation.max_new_tokens=4",
    # Wires the sweep callback even where conf/hydra/default.yaml does not (yet) list it.
    "++hydra.callbacks.sweep._target_=fine_tune.sweep.SweepCallback",
    # Job dir names that stay under the file-name limit (Optuna's floats make long override lists).
    "hydra.sweep.subdir='${fine_tune.job_subdir:${hydra.job.override_dirname},${hydra.job.num}}'",
]


def fine_tune(cwd: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """`python -m fine_tune ARGS` + TINY from `cwd`, with (fake) secrets in the environment."""
    env = {"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
    env.update(WANDB_API_KEY=FAKE_WANDB_KEY, HF_TOKEN=FAKE_HF_TOKEN)
    return cli([*args, *TINY], env=env, timeout=timeout, cwd=cwd)


def job_dirs(sweep_dir: Path) -> dict[str, Path]:
    """{the job's lora.* overrides (from its .hydra/overrides.yaml): job dir}."""
    out = {}
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        overrides = [o for o in yaml.safe_load(overrides_file.read_text()) if o.startswith("lora.")]
        out[",".join(sorted(overrides))] = overrides_file.parent.parent
    return out


def assert_no_secrets(root: Path, *texts: str) -> None:
    for secret in (FAKE_WANDB_KEY, FAKE_HF_TOKEN):
        for text in texts:
            assert secret not in text
        for file in root.rglob("*"):
            if file.is_file():
                assert secret.encode() not in file.read_bytes(), f"{secret[:6]}... in {file}"


@pytest.mark.subprocess
def test_four_jobs_in_one_process_are_four_grouped_wandb_runs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = fine_tune(
        tmp_path, "-m", "lora.r=2,4", "lora.lora_alpha=4,8", "logger=wandb", f"hydra.sweep.dir={sweep_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 4
    groups, names = set(), set()
    for key, job_dir in jobs.items():
        (wandb_file,) = find_runs(job_dir)  # exactly one W&B run per job, inside its own dir
        run = read_run(wandb_file)
        groups.add(run["group"])
        names.add(run["name"])
        wanted = dict(o.split("=") for o in key.split(","))
        assert run["name"] == f"r={wanted['lora.r']},alpha={wanted['lora.lora_alpha']}"
        assert run["config"]["lora.r"] == int(wanted["lora.r"])
        assert run["config"]["lora.lora_alpha"] == int(wanted["lora.lora_alpha"])
        assert run["config"]["trainer.max_steps"] == 2 and run["config"]["choices.trainer"] == "cpu"
        # its own loss history: exactly the losses this job wrote to its metrics.jsonl
        logged = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
        local = [(r["step"], r["train/loss"]) for r in logged if "train/loss" in r]
        remote = [(h["_step"], h["train/loss"]) for h in run["history"] if "train/loss" in h]
        assert remote == local and len(remote) == 2
        final = json.loads((job_dir / "metrics.json").read_text())
        assert run["summary"]["eval_loss"] == final["eval_loss"]
        assert run["summary"]["trainable_params"] == final["trainable_params"] > 0
        assert run["summary"]["status"] == "finished" and run["exit_code"] == 0
        logged_keys = set().union(*run["history"])
        for key in (
            "train/learning_rate",
            "train/grad_norm",
            "perf/tokens_per_second",
            "perf/peak_memory_gib",
            "eval/loss",
            "eval/perplexity",
            "samples/nrows",
        ):
            assert key in logged_keys, key
        assert run["summary"]["samples_all"]["nrows"] >= 1  # the table of generation samples
    assert groups == {"sweep"} and len(names) == 4
    assert (result.stdout + result.stderr).count("Upload later with: wandb sync") == 1
    assert_no_secrets(sweep_dir, result.stdout, result.stderr)


@pytest.mark.subprocess
def test_failing_job_is_reported_rerun_skips_finished_and_compare_matches(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "lora.r=0,2,4", "logger=none", f"hydra.sweep.dir={sweep_dir}"]  # r=0 fails in the job
    first = fine_tune(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = job_dirs(sweep_dir)
    status = {k: json.loads((d / "status.json").read_text()) for k, d in jobs.items()}
    assert {k: s["status"] for k, s in status.items()} == {
        "lora.r=0": "failed",
        "lora.r=2": "finished",
        "lora.r=4": "finished",
    }
    assert "lora.r" in status["lora.r=0"]["error"]  # the offending key is named
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["counts"] == {"failed": 1, "finished": 2}
    output = first.stdout + first.stderr
    assert "1 failed, 2 finished" in output and "r=0" in output

    finished_mtimes = {k: (jobs[k] / "metrics.json").stat().st_mtime_ns for k in ("lora.r=2", "lora.r=4")}
    failed_started = status["lora.r=0"]["started"]
    second = fine_tune(tmp_path, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {k: (jobs[k] / "metrics.json").stat().st_mtime_ns for k in finished_mtimes} == finished_mtimes
    assert (second.stdout + second.stderr).count("skipping") == 2
    rerun = json.loads((jobs["lora.r=0"] / "status.json").read_text())
    assert rerun["status"] == "failed" and rerun["ended"] >= failed_started  # it was tried again

    out = tmp_path / "compare"
    shown = compare.compare([sweep_dir], out=out)
    assert shown["differing"] == ["lora.r"]
    saved = json.loads((out / "compare.json").read_text())["rows"]  # full precision, for programs
    table = (out / "compare.md").read_text()  # for people: rounded by the rule every table uses
    for row, saved_row in zip(shown["rows"], saved, strict=True):
        metrics = sweep_dir / row["job"] / "metrics.json"
        if row["status"] == "finished":
            expected = json.loads(metrics.read_text())
            for key in ("eval_loss", "train_loss"):
                assert row[key] == saved_row[key] == expected[key]
            assert f"| {format_metric('eval_loss', expected['eval_loss'])} |" in table
    assert shown["rows"][-1]["status"] == "failed"
    png = (out / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


@pytest.mark.subprocess
def test_all_jobs_failing_exits_nonzero(tmp_path):
    result = fine_tune(tmp_path, "-m", "lora.r=0,-1", "logger=none", f"hydra.sweep.dir={tmp_path / 's'}")
    assert result.returncode != 0
    assert "no job of the sweep finished" in result.stderr


@pytest.mark.subprocess
def test_optuna_example_runs_trials_and_reports_best_params(tmp_path):
    sweep_dir = tmp_path / "optuna"
    result = fine_tune(
        tmp_path,
        "hparams_search=lora_optuna",
        "hydra.sweeper.n_trials=3",
        "logger=none",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"lora.r", "lora.lora_alpha", "optim.lr", "lora.lora_dropout"}
    finals = [json.loads(p.read_text())["eval_loss"] for p in sweep_dir.glob("*/metrics.json")]
    assert len(finals) == 3 and best["best_value"] == min(finals)
    assert "Optuna best:" in result.stdout + result.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "multirun_examples").glob("*.sh")))
def test_examples_are_valid_scripts_that_say_what_they_answer(script):
    text = (ROOT / "multirun_examples" / script).read_text()
    assert text.startswith("#!/usr/bin/env bash") and "# Question:" in text
    assert subprocess.run(["bash", "-n", str(ROOT / "multirun_examples" / script)]).returncode == 0


@pytest.mark.subprocess
@pytest.mark.slow
def test_sweep_over_lora_variants_gives_one_tracked_run_per_variant(tmp_path):
    """`-m lora=default,dora,pissa`: three W&B runs, each named by its variant and recording it."""
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "lora=default,dora,pissa", "logger=wandb", f"hydra.sweep.dir={sweep_dir}"]
    result = fine_tune(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {}
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        (wandb_file,) = find_runs(overrides_file.parent.parent)
        run = read_run(wandb_file)
        runs[run["name"]] = run
    assert set(runs) == {"lora=default", "lora=dora", "lora=pissa"}
    for name, run in runs.items():
        assert run["config"]["choices.lora"] == name.removeprefix("lora=")
        assert run["summary"]["status"] == "finished" and run["exit_code"] == 0
    assert runs["lora=dora"]["config"]["lora.use_dora"] is True
    assert runs["lora=pissa"]["config"]["lora.init_lora_weights"] == "pissa"
    trainable = {name: run["summary"]["trainable_params"] for name, run in runs.items()}
    assert trainable["lora=dora"] > trainable["lora=default"] == trainable["lora=pissa"]  # + magnitudes
