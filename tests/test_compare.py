"""`python -m fine_tune.compare` on hand-made run dirs: finished, failed, and still-running jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fine_tune import compare, sweep

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_job(root: Path, overrides: list[str], losses: list[float], final: dict | None, status: str) -> Path:
    job = root / ",".join(overrides)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    sweep.mark_running(job, overrides)
    with open(job / "metrics.jsonl", "w") as handle:
        for step, loss in enumerate(losses, 1):
            handle.write(json.dumps({"step": step, "train/loss": loss}) + "\n")
        handle.write(json.dumps({"step": len(losses), "eval/loss": losses[-1] + 0.05}) + "\n")
        handle.write('{"step": 99, "train/lo')  # a line being written right now
    if final is not None:
        (job / "metrics.json").write_text(json.dumps(final))
    if status == "finished":
        sweep.mark_finished(job, final["eval_loss"])
    elif status == "failed":
        sweep.mark_failed(job, ValueError("lora.r must be > 0"))
    return job


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "multirun" / "grid"
    common = "trainer=cpu"
    make_job(
        root, ["lora.r=4", common], [3.0, 2.8, 2.6], {"eval_loss": 2.7123456, "train_loss": 2.6}, "finished"
    )
    make_job(
        root, ["lora.r=16", common], [3.0, 2.5, 2.2], {"eval_loss": 2.3187654, "train_loss": 2.2}, "finished"
    )
    make_job(root, ["lora.r=0", common], [3.0], None, "failed")
    make_job(root, ["lora.r=8", common], [3.0, 2.7], None, "running")  # no metrics.json yet
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_table_sorted_by_metric_with_differing_overrides_only(sweep_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert compare.main([str(sweep_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    assert result["differing"] == ["lora.r"] and result["common"] == {"trainer": "cpu"}
    order = [(r["overrides"]["lora.r"], r["status"]) for r in result["rows"]]
    # finished/running ranked by eval loss (the running job by its latest logged eval), failed last
    assert order == [("16", "finished"), ("4", "finished"), ("8", "running"), ("0", "failed")]
    for row in result["rows"]:
        metrics = sweep_dir / row["job"] / "metrics.json"
        if metrics.is_file():
            assert row["eval_loss"] == json.loads(metrics.read_text())["eval_loss"]
    assert result["rows"][2]["eval_loss"] == pytest.approx(2.75)  # from metrics.jsonl
    header = printed.splitlines()[0].split()
    assert header[:4] == ["#", "lora.r", "status", "eval_loss"] and "trainer" not in header
    assert "shared overrides: trainer=cpu" in printed


def test_markdown_numbers_equal_metrics_json_and_png_is_valid(sweep_dir, tmp_path):
    out = tmp_path / "report"
    compare.compare([sweep_dir], out=out)
    lines = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        metrics = sweep_dir / cells["dir"] / "metrics.json"
        if metrics.is_file():
            expected = json.loads(metrics.read_text())
            assert float(cells["eval_loss"]) == expected["eval_loss"]
            assert float(cells["train_loss"]) == expected["train_loss"]
    assert "lora.r=0" in (out / "compare.md").read_text().split("## Not finished")[1]
    png = (out / "loss_curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out / "loss_curves.png").shape
    assert width > 500 and height > 200
    html = (out / "compare.html").read_text()
    assert "<table>" in html and "loss_curves.png" in html and html.count("<tr>") == 5


def test_run_dirs_can_be_given_one_by_one_and_default_out_is_inside_the_sweep(
    sweep_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = compare.compare([sweep_dir / "lora.r=4,trainer=cpu", sweep_dir / "lora.r=16,trainer=cpu"])
    assert [r["job"] for r in result["rows"]] == ["lora.r=16,trainer=cpu", "lora.r=4,trainer=cpu"]
    assert (tmp_path / "compare" / "loss_curves.png").is_file()
    compare.compare([sweep_dir])
    assert (sweep_dir / "compare" / "compare.md").is_file()
    assert len(compare.load_jobs([sweep_dir])) == 4  # its own output dir is not taken for a job


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/sweep"], "no such directory"),
        (["EMPTY"], "no runs found"),
        (["SWEEP", "--metric", "eval_los"], "unknown metric"),
    ],
)
def test_bad_input_exits_2_without_traceback(args, message, sweep_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else str(sweep_dir) if a == "SWEEP" else a for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "fine_tune.compare", *args, "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
