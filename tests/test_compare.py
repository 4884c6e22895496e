"""`python -m fine_tune.compare` on hand-made run dirs: finished, failed, and still-running jobs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from helpers import cli

from fine_tune import compare, sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_job(root: Path, overrides: list[str], losses: list[float], final: dict | None, status: str) -> Path:
    job = root / ",".join(overrides)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    sweep.mark_running(job, overrides)
    with open(job / "metrics.jsonl", "w") as handle:
        for step, loss in enumerate(losses, 1):
            handle.write(json.dumps({"step": step, "train/loss": loss}) + "\n")
            handle.write(json.dumps({"step": step, "eval/loss": loss + 0.05}) + "\n")
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
    counts = {"steps": 3, "tokens_seen": 1536, "tokens_per_second": 411.52631578947364}
    make_job(
        root,
        ["lora.r=4", common],
        [3.0, 2.8, 2.6],
        {"eval_loss": 2.7123456, "train_loss": 2.6000000953674316, **counts},
        "finished",
    )
    make_job(
        root,
        ["lora.r=16", common],
        [3.0, 2.5, 2.2],
        {"eval_loss": 2.3187654, "train_loss": 2.2, **counts},
        "finished",
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


def test_markdown_shows_rounded_metrics_json_values_and_png_is_valid(sweep_dir, tmp_path):
    out = tmp_path / "report"
    result = compare.compare([sweep_dir], out=out)
    lines = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    checked = 0
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        metrics = sweep_dir / cells["dir"] / "metrics.json"
        if metrics.is_file():
            expected = json.loads(metrics.read_text())
            assert cells["eval_loss"] == f"{expected['eval_loss']:.4f}"  # 2.7123, not 2.7123456
            assert cells["train_loss"] == f"{expected['train_loss']:.4f}"  # 2.6000, not 2.6000000953674316
            assert cells["steps"] == str(expected["steps"])  # 3, not 3.0
            assert cells["tok/s"] == str(round(expected["tokens_per_second"]))
            checked += 1
        elif cells["status"] == "running":
            assert cells["steps"] == "2" and cells["eval_loss"] == "2.7500"  # latest logged, not 2.0
    assert checked == 2
    # programs read compare.json: full precision there
    assert {r["eval_loss"] for r in result["rows"]} >= {2.7123456, 2.3187654}
    assert "lora.r=0" in (out / "compare.md").read_text().split("## Not finished")[1]
    png = (out / "loss_curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out / "loss_curves.png").shape
    assert width > 500 and height > 200
    html = (out / "compare.html").read_text()
    assert "<table>" in html and "loss_curves.png" in html and html.count("<tr>") == 5
    assert "<td>2.3188</td>" in html


@pytest.fixture
def drawn(monkeypatch):
    """The figures compare saves, kept for inspection (legend, lines) after they are written."""
    import matplotlib.figure

    figures = []
    save = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figures


def test_legend_order_is_the_table_order_and_coinciding_curves_are_named(sweep_dir, tmp_path, drawn):
    # lora.r=32 logs exactly lora.r=4's losses, lora.r=64 within float rounding: on a tiny model
    # bitsandbytes' paged / 8-bit optimizers and torch's AdamW give such curves
    final = {"eval_loss": 2.7123456, "train_loss": 2.6000000953674316}
    make_job(sweep_dir, ["lora.r=32", "trainer=cpu"], [3.0, 2.8, 2.6], final, "finished")
    final = {"eval_loss": 2.7123457, "train_loss": 2.6000001}
    make_job(sweep_dir, ["lora.r=64", "trainer=cpu"], [3.0, 2.8, 2.6000001], final, "finished")
    result = compare.compare([sweep_dir], out=tmp_path / "report")
    ranks = [r["overrides"]["lora.r"] for r in result["rows"]]
    assert ranks == ["16", "32", "4", "64", "8", "0"]  # by eval_loss (tie by name), failed last
    (figure,) = drawn
    train, evals = figure.axes
    for axis in (train, evals):
        legend = axis.get_legend()
        labels = [t.get_text() for t in legend.get_texts()]
        assert [label.split()[0] for label in labels] == [f"r={r}" for r in ranks]
        assert legend.get_title().get_text() == "lowest eval_loss first"
        assert labels[2:4] == ["r=4 (identical to r=32)", "r=64 (overlaps r=32)"]
        assert labels[0] == "r=16" and labels[5] == "r=0 (failed)"
    lines = {line.get_label().split()[0]: line for line in train.get_lines()}
    twins = lines["r=32"], lines["r=4"]
    assert twins[0].get_linestyle() != twins[1].get_linestyle()
    assert twins[0].get_marker() != twins[1].get_marker()
    assert twins[0].get_linewidth() > twins[1].get_linewidth()  # the later line is drawn inside the earlier


def test_eval_panel_is_the_eval_loss_of_every_logged_step(sweep_dir, tmp_path, drawn):
    compare.compare([sweep_dir], out=tmp_path / "report")
    evals = drawn[0].axes[1]
    for line in evals.get_lines():
        job = next(
            p for p in sweep_dir.iterdir() if p.name.startswith(f"lora.{line.get_label().split()[0]},")
        )
        rows = [json.loads(r) for r in (job / "metrics.jsonl").read_text().splitlines()[:-1]]
        expected = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
        assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == expected
        assert line.get_marker() not in (None, "None", "")


def test_report_files_follow_the_umask(sweep_dir, tmp_path):
    previous = os.umask(0o027)
    try:
        result = compare.compare([sweep_dir], out=tmp_path / "report")
    finally:
        os.umask(previous)
    files = [Path(f) for f in result["files"].values()] + [tmp_path / "report" / "compare.json"]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o640}
    assert stat.S_IMODE((tmp_path / "report").stat().st_mode) == 0o750


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


@pytest.mark.subprocess
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
    result = cli([*args, "--out", str(tmp_path / "o")], module="fine_tune.compare", timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
