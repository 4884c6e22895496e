"""Load a finished (or checkpointed) run back: base model + adapter + tokenizer + prompt template.

Why from the run dir and not from flags: the run's `.hydra/config.yaml` is the only complete record
of which base model, quantization, tokenizer and template the adapter was trained against. Building
the base through the same `model` node (same builder, same seed for tiny random models) and the
prompt through the same template is what makes generation and export match training.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fine_tune.errors import EXIT_USER_ERROR, UserError, report


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: Any  # the run's composed config (DictConfig)
    model: Any  # PeftModel (base + adapter), eval mode
    tokenizer: Any
    template: str
    adapter_dir: Path


def parse_args(argv: list[str], allowed: dict[str, Any]) -> dict[str, Any]:
    """`key=value` arguments (Hydra style, values typed like YAML); unknown keys are user errors."""
    from omegaconf import OmegaConf

    values = dict(allowed)
    for arg in argv:
        if arg in ("-h", "--help"):
            raise SystemExit(0)
        key, sep, raw = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep or key not in allowed:
            raise UserError(
                f"unknown argument '{arg}'",
                where=key or arg,
                hint=f"arguments are key=value with keys {sorted(allowed)}",
            )
        value = OmegaConf.from_dotlist([f"v={raw}"]).v if raw != "" else ""
        values[key] = _typed(key, value, allowed[key])
    return values


def _typed(key: str, value: Any, default: Any) -> Any:
    """The value in the type of the argument's default (None defaults take text or nothing)."""
    if default is None:
        return None if value is None else str(value)
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind in (int, float) and not isinstance(value, bool):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(value, kind):
        return value
    raise UserError(f"expected {kind.__name__}, got {value!r}", where=key)


def run_main(main: Any, argv: list[str] | None = None) -> None:
    """Entrypoint wrapper: user errors print one paragraph and exit 2, never a traceback."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        report(error)
        sys.exit(EXIT_USER_ERROR)


def load_config(run_dir: str | Path) -> tuple[Path, Any]:
    from omegaconf import OmegaConf

    if not run_dir:
        raise UserError(
            "which run?", where="run", hint="run=<run dir> (holds .hydra/config.yaml and adapter/)"
        )
    path = Path(str(run_dir)).expanduser()
    config = path / ".hydra" / "config.yaml"
    if not config.is_file():
        raise UserError(
            f"'{path}' is not a run directory (no .hydra/config.yaml)",
            where="run",
            hint="pass the directory a `python -m fine_tune` run wrote",
        )
    return path, OmegaConf.load(config)


def adapter_dir_of(run_dir: Path, checkpoint: str | None) -> Path:
    """The finished run's adapter/, or a checkpoint's (checkpoint=latest | <path>)."""
    if checkpoint:
        from fine_tune.training.checkpoints import find_checkpoint

        found = find_checkpoint(True if str(checkpoint) == "latest" else checkpoint, run_dir)
        if found is None:
            raise UserError(f"no checkpoint in '{run_dir}'", where="checkpoint")
        return found
    from fine_tune.adapters import ADAPTER_CONFIG

    adapter = run_dir / "adapter"
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"'{run_dir}' has no trained adapter (adapter/{ADAPTER_CONFIG})",
            where="run",
            hint="the run did not finish: use checkpoint=latest, or resume it with resume=true",
        )
    return adapter


def template_of(run_dir: Path, cfg: Any, tokenizer: Any) -> str:
    """The template the run trained with (recorded in data_report.json), else resolved the same way."""
    from fine_tune.utils.io import read_json

    recorded = (read_json(run_dir / "data_report.json") or {}).get("template")
    if recorded:
        return str(recorded)
    from fine_tune.data.templates import resolve_template

    dataset = cfg.get("dataset") or {}
    if dataset.get("format") == "text":
        return "none"
    return resolve_template(dataset.get("template", "auto"), tokenizer)


def recipe_of(cfg: Any, quant: Any = None, dtype: str | None = None) -> Any:
    """The run's Recipe (its tokenizer, its base through its own `model` node), optionally with
    another quant node (quant=None: the run's quantization) or model dtype."""
    from omegaconf import OmegaConf

    from fine_tune.quiet import quiet_libraries
    from fine_tune.recipe import Recipe

    quiet_libraries()
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # the caller's config stays the run's
    if quant is not None:
        cfg.quant = quant
    if dtype is not None:
        cfg.model.dtype = dtype
    return Recipe(cfg)


def load_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    quant: Any = None,
    dtype: str | None = None,
    dequantize: bool = False,
) -> LoadedRun:
    """Base + adapter in eval mode, the run's tokenizer and template; see the module docstring.

    `dequantize=True` turns the run's 4-bit base into plain float weights (in `dtype`) before the
    adapter is attached: the weights the adapter was trained against, without bitsandbytes.
    """
    path, cfg = load_config(run_dir)
    adapter = adapter_dir_of(path, checkpoint)
    recipe = recipe_of(cfg, quant=quant, dtype=dtype)
    model = recipe.with_adapter(adapter, dequantize, dtype, run_dir=path)  # expert adapters included
    tokenizer = recipe.tokenizer
    return LoadedRun(path, cfg, model, tokenizer, template_of(path, cfg, tokenizer), adapter)
