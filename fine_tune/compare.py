"""`python -m fine_tune.compare <multirun dir | run dirs> [--metric eval_loss] [--out DIR]`

Compares the jobs of a sweep from the files every run dir already holds (metrics.jsonl,
metrics.json, status.json, .hydra/overrides.yaml): no W&B account, server or sync needed, and it
works while the sweep is still running or after some jobs failed (those rows say so, with what
was logged so far). Only the overrides that differ between jobs become columns, because those
are the question the sweep asked; the ones shared by all jobs are listed once.

Writes into --out (default `<sweep dir>/compare`, or `./compare` for several dirs):
compare.md, compare.html, compare.json and loss_curves.png.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fine_tune.errors import EXIT_USER_ERROR, UserError, report
from fine_tune.tracking.base import run_name, split_override
from fine_tune.utils.format import finite_number, format_metric
from fine_tune.utils.io import atomic_file, atomic_write_json, atomic_write_text, read_json

_BROKEN = {"failed", "oom", "preempted", "unknown"}
_SKIP_DIRS = {"wandb", "tensorboard", "checkpoints", "adapter", "tokenizer", "compare", "__pycache__"}
# Extra columns shown after the chosen metric (metrics.json key -> header).
_EXTRA = [
    ("train_loss", "train_loss"),
    ("eval_perplexity", "eval_ppl"),
    ("steps", "steps"),
    ("tokens_per_second", "tok/s"),
    ("peak_memory_gib", "peak_GiB"),
    ("runtime_s", "runtime_s"),
]
# Preference runs (method=dpo / orpo): shown when any job has them. The share of pairs whose chosen
# answer gets the higher implicit reward, and the mean reward margin (docs/contracts.md).
_PREFERENCE_EXTRA = [
    ("eval_reward_accuracy", "eval_acc"),
    ("eval_reward_margin", "eval_margin"),
    ("reward_accuracy", "acc"),
    ("reward_margin", "margin"),
]


def extra_columns(jobs: Sequence[Job], metric: str) -> list[tuple[str, str]]:
    """(metrics.json key, header) of the columns after the chosen metric."""
    shown = [(k, h) for k, h in _PREFERENCE_EXTRA if any(job.value(k) is not None for job in jobs)]
    return [(k, h) for k, h in shown + _EXTRA if k != metric]


@dataclass
class Job:
    """Everything one run dir says about itself; any part may be missing in a running/failed job."""

    path: Path
    name: str
    overrides: list[str] = field(default_factory=list)
    status: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state(self) -> str:
        """status.json's word; a dir without one is `running` while it logs, else `unknown`."""
        if self.status and self.status.get("status"):
            return str(self.status["status"])
        return "running" if self.history else "unknown"

    def value(self, metric: str) -> float | None:
        """The metric from metrics.json, else its latest value in metrics.jsonl (running jobs)."""
        number = finite_number((self.metrics or {}).get(metric))
        if number is not None:
            return number
        for key in _jsonl_keys(metric):
            for row in reversed(self.history):
                number = finite_number(row.get(key))
                if number is not None:
                    return number
        return None

    def curve(self, key: str) -> tuple[list[float], list[float]]:
        steps, values = [], []
        for index, row in enumerate(self.history):
            value = finite_number(row.get(key))
            if value is not None:
                step = finite_number(row.get("step"))
                steps.append(step if step is not None else float(index))
                values.append(value)
        return steps, values


def _jsonl_keys(metric: str) -> list[str]:
    """metrics.json names -> the per-step names of the same quantity (eval_loss -> eval/loss)."""
    keys = [metric]
    if "/" not in metric and "_" in metric:
        head, tail = metric.split("_", 1)
        keys.append(f"{head}/{tail}")
    aliases = {
        "tokens_per_second": "perf/tokens_per_second",
        "peak_memory_gib": "perf/peak_memory_gib",
        "steps": "step",
        "tokens_seen": "perf/tokens_seen",
        "reward_accuracy": "train/rewards/accuracies",
        "reward_margin": "train/rewards/margins",
        "eval_reward_accuracy": "eval/rewards/accuracies",
        "eval_reward_margin": "eval/rewards/margins",
    }
    if metric in aliases:
        keys.append(aliases[metric])
    return keys


def _is_job_dir(path: Path) -> bool:
    markers = (".hydra/overrides.yaml", "status.json", "metrics.jsonl", "metrics.json")
    return any((path / marker).is_file() for marker in markers)


def find_job_dirs(root: Path) -> list[Path]:
    """Job dirs at or under `root`, without descending into a job's own subfolders."""
    if _is_job_dir(root):
        return [root]
    found = []
    for current, dirs, _files in os.walk(root):
        here = Path(current)
        if here != root and _is_job_dir(here):
            found.append(here)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
    return sorted(found)


def _read_overrides(path: Path) -> list[str] | None:
    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return None
    try:
        import yaml

        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - a half-written file during a running sweep
        return None
    return [str(o) for o in data] if isinstance(data, list) else None


def _read_history(path: Path) -> list[dict[str, Any]]:
    rows = []
    file = path / "metrics.jsonl"
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines() if file.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a blank line, or the one being written now
            rows.append(json.loads(line))
    return [row for row in rows if isinstance(row, dict)]


def load_job(path: Path, root: Path | None = None) -> Job:
    """Read one run dir; never fails on missing or partial files."""
    status = read_json(path / "status.json")
    status = status if isinstance(status, dict) else None
    overrides = _read_overrides(path)
    if overrides is None:
        overrides = [str(o) for o in (status or {}).get("overrides") or []]
    metrics = read_json(path / "metrics.json")
    return Job(
        path=path,
        name=path.relative_to(root).as_posix() if root is not None and path != root else path.name,
        overrides=overrides,
        status=status,
        metrics=metrics if isinstance(metrics, dict) else None,
        history=_read_history(path),
    )


def load_jobs(paths: Sequence[Path], missing_ok: bool = False) -> list[Job]:
    """Every job under the given sweep dirs / run dirs, in path order."""
    jobs: list[Job] = []
    seen: set[Path] = set()
    for path in paths:
        path = Path(path)
        if not path.exists():
            if missing_ok:
                continue
            raise UserError(
                "no such directory",
                where=str(path),
                hint="pass a multirun dir (multirun/...) or one or more run dirs (outputs/...)",
            )
        if not path.is_dir():
            raise UserError("not a directory", where=str(path), hint="pass a sweep dir or run dirs")
        for job_dir in find_job_dirs(path):
            if job_dir.resolve() in seen:
                continue
            seen.add(job_dir.resolve())
            jobs.append(load_job(job_dir, root=path if job_dir != path else None))
    return jobs


def differing_overrides(jobs: Sequence[Job]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between jobs, {key: value} shared by every job)."""
    per_job = [dict(split_override(o) for o in job.overrides) for job in jobs]
    keys = list(dict.fromkeys(k for mapping in per_job for k in mapping))  # first-seen order
    differ, common = [], {}
    for key in keys:
        values = {m.get(key) for m in per_job}
        if len(values) == 1 and None not in values:
            common[key] = values.pop()
        else:
            differ.append(key)
    return differ, common


def build_rows(jobs: Sequence[Job], metric: str, descending: bool = False) -> list[dict[str, Any]]:
    """One dict per job, sorted by `metric`; failed jobs and jobs without the metric last."""
    differ, _ = differing_overrides(jobs)
    extras = extra_columns(jobs, metric)
    rows = []
    for job in jobs:
        mapping = dict(split_override(o) for o in job.overrides)
        row: dict[str, Any] = {"job": job.name, "dir": str(job.path), "status": job.state}
        row["overrides"] = {k: mapping.get(k) for k in differ}
        row[metric] = job.value(metric)
        row.update({key: job.value(key) for key, _header in extras})
        row["error"] = (job.status or {}).get("error")
        rows.append(row)
    sign = -1.0 if descending else 1.0
    # Failed jobs go below the others whatever their partial metric: the top row must be a winner.
    rows.sort(key=lambda r: (r[metric] is None, r["status"] in _BROKEN, sign * (r[metric] or 0.0), r["job"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table of formatted cells (no rich dependency, pastes into any issue or log)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Formatted cells as a Markdown table (full precision stays in the .json files)."""
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _table(
    rows: list[dict[str, Any]], metric: str, extras: list[tuple[str, str]], with_dir: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells: the rank, the differing overrides, status, metric, extras."""
    differ = list(rows[0]["overrides"]) if rows else []
    headers = ["#"] + (differ or ["job"]) + ["status", metric] + [h for _, h in extras]
    body = []
    for row in rows:
        line = [str(row["rank"])]
        line += [row["overrides"].get(k) or "-" for k in differ] if differ else [row["job"]]
        line += [row["status"], format_metric(metric, row[metric])]
        line += [format_metric(k, row[k]) for k, _ in extras]
        body.append(line)
    if with_dir:
        headers.append("dir")
        for line, row in zip(body, rows, strict=True):
            line.append(row["job"])
    return headers, body


# One colour, line style and marker per job: where curves coincide (two optimizers doing the same
# math, say), a thinner dashed line drawn over a thicker solid one keeps both visible.
_LINESTYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _panel_curve(job: Job, key: str) -> tuple[list[float], list[float]]:
    """The logged curve; a job that logged no eval row still shows its final eval as one point."""
    steps, values = job.curve(key)
    if not steps and key == "eval/loss":
        final = finite_number((job.metrics or {}).get("eval_loss"))
        if final is not None:
            last = finite_number((job.metrics or {}).get("steps"))
            steps, values = [last if last is not None else 0.0], [final]
    return steps, values


def _overlap(curve: tuple[list[float], list[float]], drawn: list[tuple[str, tuple]]) -> str:
    """` (identical to X)` / ` (overlaps X)` when an earlier job drew the same curve, exactly or
    within 1e-4 relative (indistinguishable on the plot); else ``."""
    steps, values = curve
    same = [label for label, other in drawn if other == curve]
    if same:
        return f" (identical to {same[0]})"
    close = [
        label
        for label, (other_steps, other_values) in drawn
        if other_steps == steps
        and all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(values, other_values, strict=True))
    ]
    return f" (overlaps {close[0]})" if close else ""


def plot_curves(jobs: Sequence[Job], path: Path, title: str = "", legend_title: str = "") -> Path:
    """Train and eval loss vs step, one line per job, legend in the order given (the table's).

    A curve equal to one drawn before it says so in the legend (`identical to <job>`, or `overlaps
    <job>` within 1e-4): on a tiny model, for example, bitsandbytes' paged and 8-bit optimizers run
    the same 32-bit AdamW math and their curves coincide. Failed jobs are drawn faded. Eval points
    are few, so every one is marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    differ, _ = differing_overrides(jobs)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), squeeze=False)
    panels = [(axes[0][0], "train/loss", "train loss"), (axes[0][1], "eval/loss", "eval loss")]
    drawn: list[list[tuple[str, tuple]]] = [[], []]  # (label, curve) already on each panel
    longest = [0, 0]
    for index, job in enumerate(jobs):
        mapping = dict(split_override(o) for o in job.overrides)
        label = run_name([f"{k}={mapping[k]}" for k in differ if k in mapping], fallback=job.name)
        label = label if job.state in ("finished", "running") else f"{label} ({job.state})"
        style = {
            "color": f"C{index % 10}",
            "linestyle": _LINESTYLES[index % len(_LINESTYLES)],
            "marker": _MARKERS[index % len(_MARKERS)],
            "linewidth": max(3.0 - 0.5 * index, 1.0),
            "markersize": max(8.0 - index, 4.0),
            "alpha": 1.0 if job.state in ("finished", "running") else 0.5,
        }
        for panel, (axis, key, _name) in enumerate(panels):
            steps, values = _panel_curve(job, key)
            if not steps:
                continue
            overlap = _overlap((steps, values), drawn[panel])
            drawn[panel].append((label, (steps, values)))
            every = 1 if key == "eval/loss" else max(len(steps) // 10, 1)
            axis.plot(
                steps,
                values,
                label=label + overlap,
                markevery=(index % every, every),  # staggered: markers of coinciding lines do not stack
                **style,
            )
            longest[panel] = max(longest[panel], len(steps))
    for panel, (axis, _key, name) in enumerate(panels):
        axis.set_title(
            name if longest[panel] != 1 else f"{name} (one point per run; lower trainer.eval_steps)"
        )
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(True, alpha=0.3)
        if longest[panel]:
            axis.legend(fontsize=7, loc="best", title=legend_title or None, title_fontsize=7)
        else:
            axis.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=axis.transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _html(title: str, common: dict[str, str], headers: list[str], body: list[list[Any]], image: str) -> str:
    esc = lambda c: html.escape(str(c))  # noqa: E731
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>\n" for row in body)
    shared = ", ".join(f"{k}={v}" for k, v in common.items()) or "none"
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>"
        + html.escape(title)
        + "</title><style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>Overrides shared by all jobs: {html.escape(shared)}</p>\n"
        f"<table><tr>{head}</tr>\n{rows}</table>\n<p><img src='{html.escape(image)}' alt='loss curves'></p>\n"
        "</body></html>\n"
    )


def compare(
    paths: Sequence[str | os.PathLike],
    metric: str = "eval_loss",
    out: str | os.PathLike | None = None,
    descending: bool = False,
) -> dict[str, Any]:
    """Load, rank, render and write; returns what compare.json holds (plus the text table)."""
    roots = [Path(p) for p in paths]
    if not roots:
        raise UserError("no directories given", hint="python -m fine_tune.compare multirun/<sweep dir>")
    jobs = load_jobs(roots)
    if not jobs:
        raise UserError(
            "no runs found (no status.json, metrics or .hydra/ below it)",
            where=", ".join(str(r) for r in roots),
            hint="pass the sweep dir Hydra printed (multirun/...) or run dirs (outputs/...)",
        )
    known = {key for job in jobs for logged in (job.metrics or {}, *job.history) for key in logged}
    if any(job.metrics for job in jobs) and not any(k in known for k in _jsonl_keys(metric)):
        raise UserError(
            f"unknown metric {metric!r}",
            where="--metric",
            hint="one of: " + ", ".join(sorted(k for k in known if isinstance(k, str))),
        )
    rows = build_rows(jobs, metric, descending=descending)
    differ, common = differing_overrides(jobs)
    if out is None:
        single_sweep = len(roots) == 1 and not _is_job_dir(roots[0])
        out = roots[0] / "compare" if single_sweep else Path("compare")
    out = Path(out)
    order = "highest" if descending else "lowest"
    title = (
        f"{len(jobs)} runs of " + ", ".join(str(r) for r in roots) + f", sorted by {metric} ({order} first)"
    )
    extras = extra_columns(jobs, metric)
    headers, body = _table(rows, metric, extras)
    text = text_table(headers, body)
    by_dir = {str(job.path): job for job in jobs}
    image = plot_curves(
        [by_dir[row["dir"]] for row in rows],  # the table's order: the legend's first line is its row 1
        out / "loss_curves.png",
        title=title,
        legend_title=f"{order} {metric} first",
    )
    md_headers, md_body = _table(rows, metric, extras, with_dir=True)
    shared = ", ".join(f"`{k}={v}`" for k, v in common.items()) or "none"
    failures = [r for r in rows if r["status"] not in ("finished", "running")]
    md = [
        f"# {title}",
        "",
        f"Overrides shared by all jobs: {shared}",
        "",
        markdown_table(md_headers, md_body),
        "",
        "Numbers are rounded for reading; `compare.json` holds them at full precision.",
    ]
    if failures:
        md += ["", "## Not finished", ""]
        md += [
            f"- `{r['job']}`: {r['status']}: {(r['error'] or '').splitlines()[0] if r['error'] else ''}"
            for r in failures
        ]
    md += ["", f"![loss curves]({image.name})", ""]
    atomic_write_text(out / "compare.md", "\n".join(md))
    atomic_write_text(out / "compare.html", _html(title, common, md_headers, md_body, image.name))
    result = {
        "metric": metric,
        "differing": differ,
        "common": common,
        "rows": rows,
        "files": {"png": str(image), "md": str(out / "compare.md"), "html": str(out / "compare.html")},
    }
    atomic_write_json(out / "compare.json", result)
    result["text"] = text
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fine_tune.compare",
        description="Compare the jobs of a sweep (or any run dirs) from their local logs; no W&B needed.",
    )
    parser.add_argument("paths", nargs="+", help="a multirun/sweep dir, or run dirs")
    parser.add_argument(
        "--metric", default="eval_loss", help="metrics.json key to sort by (default eval_loss)"
    )
    parser.add_argument(
        "--desc", action="store_true", help="sort descending (for metrics where higher is better)"
    )
    parser.add_argument("--out", default=None, help="output dir (default <sweep dir>/compare or ./compare)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.paths, metric=args.metric, out=args.out, descending=args.desc)
    except UserError as error:
        report(error)
        return EXIT_USER_ERROR
    print(result["text"])
    if result["common"]:
        print("\nshared overrides: " + ", ".join(f"{k}={v}" for k, v in result["common"].items()))
    print("\nwrote " + ", ".join(result["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
