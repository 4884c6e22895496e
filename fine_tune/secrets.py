"""Credentials stay out of configs: tokens come from the environment or the tools' own login files.

Why refuse rather than redact: a composed config is saved to `.hydra/config.yaml`, logged to W&B,
copied into model cards and shared with run directories. A token put on the command line
(`+hf_token=hf_...`) would end up in all of them, so the run stops, the copies Hydra already wrote
are scrubbed, and the message says where tokens belong (HF_TOKEN / `huggingface-cli login`,
WANDB_API_KEY / `wandb login`). The message never repeats the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fine_tune.errors import UserError
from fine_tune.tracking.base import flatten
from fine_tune.tracking.redact import HEX_OK_KEYS, is_secret_key, redact_text

HINT = (
    "remove it; put Hugging Face tokens in HF_TOKEN or `huggingface-cli login`, W&B keys in "
    "WANDB_API_KEY or `wandb login`"
)


def find_secret(data: Any) -> str | None:
    """The dotted key of the first value that is, or looks like, a credential; None if clean."""
    for key, value in flatten(data).items():
        if is_secret_key(key) and value not in (None, "", False, [], {}):
            return key
        values = value if isinstance(value, list) else [value]
        last = key.rsplit(".", 1)[-1].lower()
        for item in values:
            if isinstance(item, str) and redact_text(item, allow_hex40=last in HEX_OK_KEYS) != item:
                return key
    return None


def check_no_secrets(data: Any, run_dir: str | Path | None = None) -> None:
    """Refuse a config holding a credential, scrubbing the copies Hydra already saved in `run_dir`."""
    key = find_secret(data)
    if key is None:
        return
    if run_dir is not None:
        scrub_dir(Path(run_dir) / ".hydra")
    raise UserError("looks like a credential; tokens are never read from configs", where=key, hint=HINT)


def guard(cfg: Any, run_dir: str | Path | None) -> None:
    """`check_no_secrets` on the composed config before it is resolved."""
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(cfg, resolve=False)
    except Exception:  # noqa: BLE001 - an unresolvable config is validation's to report
        return
    check_no_secrets(data, run_dir)


def scrub_dir(directory: Path) -> None:
    """Redact token-shaped strings and secret-keyed values in the saved config files, in place."""
    from fine_tune.tracking.redact import redact_override
    from fine_tune.utils.io import atomic_write_text

    if not directory.is_dir():
        return
    for path in directory.glob("*.yaml"):
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if stripped.startswith("- ") and "=" in stripped:  # overrides.yaml / hydra.yaml task lists
                indent = line[: len(line) - len(line.lstrip())]
                line = f"{indent}- {redact_override(stripped[2:])}"
            elif ":" in stripped and is_secret_key(stripped.split(":", 1)[0].strip()):
                head = line.split(":", 1)[0]
                line = f"{head}: '***REDACTED***'"
            lines.append(redact_text(line))
        atomic_write_text(path, "\n".join(lines) + "\n")
