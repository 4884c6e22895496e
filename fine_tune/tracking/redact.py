"""Keep credentials out of everything we write or send: run configs, W&B, TensorBoard, summaries.

Configs are logged whole (so dashboards can group by any key), which means a token pasted into an
override, an env-derived value or an error message would otherwise travel to a server and into
run directories that get shared. `redact()` is applied to everything the trackers and the sweep
tooling emit; it is deliberately eager (a false positive costs a masked string, a false negative
costs a leaked key).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***REDACTED***"

# Key names (last dotted component, lower-cased) whose values are secrets whatever they look like.
_SECRET_KEY = re.compile(
    r"(^|[_.-])(token|secret|secrets|password|passwd|passphrase|api[_-]?key|apikey|access[_-]?key"
    r"|secret[_-]?key|private[_-]?key|credential|credentials|auth|authorization|bearer|cookie)$"
)
# Tokenizer vocabulary entries are called "*_token" but are not secrets.
_NOT_SECRET_KEYS = {
    "pad_token",
    "eos_token",
    "bos_token",
    "unk_token",
    "sep_token",
    "cls_token",
    "mask_token",
    "chat_token",
    "additional_special_token",
    "special_token",
    "eot_token",
    "im_start_token",
    "im_end_token",
    "response_token",
    "instruction_token",
}
# Keys that legitimately hold 40-hex-digit values (git commits / hub revisions).
HEX_OK_KEYS = {"revision", "commit", "sha", "git_commit", "code_revision", "hash"}

# Token shapes of the services this project talks to (and a few common neighbours).
_TOKEN_PATTERNS = [
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),  # Hugging Face
    re.compile(r"\b(?:wandb_v\d+_|local-)[A-Za-z0-9_]{20,}\b"),  # W&B new-style / local server keys
    re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}\b"),  # OpenAI-style
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}\b"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),  # Slack
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{16,}=*"),
]
_HEX40 = re.compile(r"(?<![0-9A-Fa-f])[0-9a-f]{40}(?![0-9A-Fa-f])")  # classic W&B API key
# TOKENIZER / TOKENIZERS_PARALLELISM name tokenizers, not tokens: their values (paths) are not secrets.
_ENV_SECRET_NAME = re.compile(r"(TOKEN(?!IZER)|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|ACCESS_KEY|PRIVATE_KEY)")


def is_secret_key(key: object) -> bool:
    """True for config/dict keys whose value must never be logged (`hf_token`, `wandb.api_key`...)."""
    name = str(key).rsplit(".", 1)[-1].strip().lower().lstrip("+~")
    if name in _NOT_SECRET_KEYS or name.endswith("_token_id") or name.endswith("_tokens"):
        return False
    return bool(_SECRET_KEY.search(name))


def _env_secrets() -> list[str]:
    """Values of secret-named environment variables, so that even odd-shaped tokens get masked."""
    values = {v for k, v in os.environ.items() if _ENV_SECRET_NAME.search(k.upper()) and len(v) >= 8}
    # Longest first, so a token that contains another is masked whole.
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, *, allow_hex40: bool = False, env_values: Iterable[str] | None = None) -> str:
    """Mask every token-shaped substring of `text` (and any secret env var's value)."""
    if not isinstance(text, str) or not text:
        return text
    for value in env_values if env_values is not None else _env_secrets():
        if value in text:
            text = text.replace(value, MASK)
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(MASK, text)
    if not allow_hex40:
        text = _HEX40.sub(MASK, text)
    return text


def redact(obj: Any, *, key: object = None, _env: list[str] | None = None) -> Any:
    """Return a copy of `obj` (dicts, lists, strings, scalars) with secrets masked.

    Dict values under secret-looking keys are masked whole (if non-empty); strings anywhere are
    scanned for token shapes. `key` is the name `obj` is stored under, when known.
    Non-container objects other than strings are returned unchanged.
    """
    env = _env if _env is not None else _env_secrets()
    if key is not None and is_secret_key(key) and obj not in (None, "", False):
        return MASK
    if isinstance(obj, Mapping):
        return {k: redact(v, key=k, _env=env) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [redact(v, _env=env) for v in obj]
        return type(obj)(items) if isinstance(obj, tuple) else items
    if isinstance(obj, str):
        last = str(key).rsplit(".", 1)[-1].lower() if key is not None else ""
        return redact_text(obj, allow_hex40=last in HEX_OK_KEYS, env_values=env)
    return obj


def redact_override(override: str) -> str:
    """Mask the value of one Hydra override string (`+hf_token=...`, `x=hf_abc...`)."""
    if "=" not in override:
        return redact_text(override)
    key, value = override.split("=", 1)
    if is_secret_key(key) and value:
        return f"{key}={MASK}"
    return f"{key}={redact(value, key=key)}"
