"""The tracker interface the core talks to, plus the run-identity helpers every backend shares.

Why a base class with no-op methods rather than a bare Protocol: the core calls every method
unconditionally (no `if tracker:`), and a backend that has nothing to say for, say, samples simply
does not override that method. The helpers here (rank, names, groups, flattened configs) live in
one place so that W&B and TensorBoard name and group the same job identically.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# One definition of "which process logs" for the whole package (hardware.rank reads RANK, SLURM_PROCID,
# LOCAL_RANK): only rank 0 logs, or N ranks would make N W&B runs for one job.
from fine_tune.hardware import is_main_process  # noqa: F401 - the trackers' import
from fine_tune.tracking.redact import redact, redact_override

# Short names for the keys people sweep most; anything else uses its last dotted component.
_SHORT = {"lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr", "name_or_path": "model"}
# Overrides that never change what a job computes: leave them out of names.
_NAME_SKIP_PREFIXES = ("hydra.", "logger", "resume", "plan", "validate", "preview")
MAX_NAME = 128  # W&B's limit for run names and groups


class Tracker:
    """Experiment-tracking backend; every method is a no-op unless a subclass needs it.

    Call order (from the core): `start` once, then `log_metrics` / `log_samples` any number of
    times, `summary` once at the end, `finish` always (in `finally`, also after a failure).
    """

    def start(self, cfg: Any, run_dir: str | os.PathLike, job: Mapping[str, Any] | None = None) -> None:
        """Open the backend's run for this job; `job` = {"overrides", "sweep_dir", "num"}."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record scalar metrics (keys like "train/loss") at an optimizer step."""

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Record generation samples ({"prompt", "completion", ...}) produced at `step`."""

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Record the final metrics of the run (metrics.json's content)."""

    def finish(self, status: str = "finished") -> None:
        """Close the run; must be safe to call twice and after a failed `start`."""


def split_override(override: str) -> tuple[str, str]:
    """`+lora.r=16` -> ("lora.r", "16"): the key without Hydra's +/~ prefix, the value as typed."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def run_name(overrides: Sequence[str], *, fallback: str | None = None) -> str | None:
    """A readable, stable job name from its overrides: `lora.r=16 optim=adamw` -> `r=16,optim=adamw`.

    Short keys (last dotted component, `lora_` dropped) keep names readable in dashboards; when two
    overrides would shorten to the same key, both keep their full key so names stay unambiguous.
    Returns `fallback` when nothing names the job.
    """
    items = []
    for override in overrides:
        key, value = split_override(redact_override(str(override)))
        if not key or key.startswith(_NAME_SKIP_PREFIXES):
            continue
        items.append((key, value))
    shorts = [_SHORT.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k, _ in items]
    parts = []
    for (key, value), short in zip(items, shorts, strict=True):
        name = short if shorts.count(short) == 1 else key
        parts.append(f"{name}={value}" if value != "" else name)
    if not parts:
        return fallback
    name = ",".join(parts)
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 3] + "..."


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of `rows`, in first-seen order: the columns of a samples table."""
    return list(dict.fromkeys(key for row in rows for key in row))


def hydra_job_info() -> dict[str, Any]:
    """What Hydra knows about the running job (mode, overrides, sweep dir, num); {} outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - trackers must work without Hydra (tests, notebooks)
        return {}
    info: dict[str, Any] = {"mode": str(getattr(hc.mode, "name", hc.mode))}
    readers = {
        "overrides": lambda: list(hc.overrides.task),
        "num": lambda: int(hc.job.num),
        "choices": lambda: {
            str(k): str(v) for k, v in hc.runtime.choices.items() if not str(k).startswith("hydra")
        },
    }
    if info["mode"].endswith("MULTIRUN"):
        readers["sweep_dir"] = lambda: str(hc.sweep.dir)
    for key, read in readers.items():
        with contextlib.suppress(Exception):
            info[key] = read()
    return info


def swept_keys(sweep_dir: str | os.PathLike | None) -> set[str]:
    """Keys the sweep varies (`lora.r` in `-m lora.r=4,8`, or an Optuna search's params).

    Run names use only these: the overrides every job shares (trainer=cpu, max_steps...) would make
    each name long and tell nothing apart. The basic sweeper leaves its command line in
    <sweep dir>/multirun.yaml before the jobs start; other sweepers keep their params in hydra.sweeper.
    """
    keys: set[str] = set()
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        params = HydraConfig.get().sweeper.get("params") or {}
        keys.update(str(k) for k in params)
    if sweep_dir and (Path(sweep_dir) / "multirun.yaml").is_file():
        with contextlib.suppress(Exception):
            from hydra.core.override_parser.overrides_parser import OverridesParser
            from omegaconf import OmegaConf

            saved = OmegaConf.load(Path(sweep_dir) / "multirun.yaml")
            task = [str(o) for o in OmegaConf.select(saved, "hydra.overrides.task", default=[]) or []]
            for override in OverridesParser.create().parse_overrides(task):
                if override.is_sweep_override():
                    keys.add(override.key_or_group)
    return keys


def job_run_name(job: Mapping[str, Any]) -> str | None:
    """The default run name of a job: its swept overrides in a sweep, all its overrides otherwise."""
    overrides = list(job.get("overrides", []))
    swept = swept_keys(job.get("sweep_dir")) if job.get("sweep_dir") else set()
    if swept:
        chosen = [o for o in overrides if split_override(o)[0] in swept]
        overrides = chosen or overrides
    fallback = f"job{job['num']}" if job.get("sweep_dir") and job.get("num") is not None else None
    return run_name(overrides, fallback=fallback)


def resolve_job(job: Mapping[str, Any] | None) -> dict[str, Any]:
    """The core's `job` dict completed from HydraConfig (the core's values win)."""
    merged = {**hydra_job_info(), **{k: v for k, v in (job or {}).items() if v is not None}}
    merged["overrides"] = [str(o) for o in merged.get("overrides", [])]
    return merged


def sweep_group(sweep_dir: str | os.PathLike | None) -> str | None:
    """The dashboard group of a sweep: its directory, relative to the cwd when inside it.

    Using the directory (rather than a random id) means a resumed sweep, rerun into the same dir,
    lands in the same group.
    """
    if not sweep_dir:
        return None
    path = Path(sweep_dir).absolute()
    try:
        text = str(path.relative_to(Path.cwd()))
    except ValueError:
        text = "/".join(path.parts[-3:])
    return text[-MAX_NAME:]


def flatten(data: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists of scalars stay lists (dashboards show them as-is).

    Flat keys are what W&B's parallel-coordinates and group-by panels (and TensorBoard's HParams)
    can use; nested dicts are only browsable.
    """
    out: dict[str, Any] = {}
    if isinstance(data, Mapping):
        if not data and prefix:
            out[prefix] = {}
        for key, value in data.items():
            name = f"{prefix}{sep}{key}" if prefix else str(key)
            out.update(flatten(value, name, sep))
    elif isinstance(data, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in data):
        for index, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{sep}{index}" if prefix else str(index), sep))
    else:
        out[prefix] = list(data) if isinstance(data, tuple) else data
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data, without the `hydra` node (that one describes Hydra itself).

    Interpolations that cannot resolve outside a Hydra run (`${hydra:...}`) are kept as text
    rather than failing the tracker.
    """
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping) and not type(cfg).__module__.startswith("omegaconf"):
        data = dict(cfg)
    else:
        from omegaconf import OmegaConf

        try:
            data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        except Exception:  # noqa: BLE001 - an unresolvable interpolation must not kill logging
            data = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    if isinstance(data, dict):
        data.pop("hydra", None)
        return data
    return {"config": data}


def run_config(cfg: Any, job: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened, redacted config + the job's overrides: what a tracker records as the run config."""
    flat = flatten(config_to_dict(cfg))
    overrides = [redact_override(o) for o in job.get("overrides", [])]
    flat["overrides"] = ",".join(overrides)
    for key, value in overrides_dict(overrides).items():
        flat.setdefault(key, value)
    for group, choice in (job.get("choices") or {}).items():
        flat[f"choices.{group}"] = choice
    if job.get("num") is not None:
        flat["job.num"] = job["num"]
    if job.get("sweep_dir"):
        flat["job.sweep_dir"] = str(job["sweep_dir"])
    return redact(flat)


def overrides_dict(overrides: Sequence[str]) -> dict[str, str]:
    """`["lora.r=16", "+x=1"]` -> {"lora.r": "16", "x": "1"} (values kept as typed on the CLI)."""
    out = {}
    for override in overrides:
        key, value = split_override(str(override))
        if key:
            out[key] = value
    return out
