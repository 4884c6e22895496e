"""Preference rows (one prompt, a chosen and a rejected answer) turned into `Pair`s.

Two layouts, declared in `formats.FORMATS`:

* `preference`: {"prompt", "chosen", "rejected"}. The prompt is a string or a message list (system /
  user / assistant turns, ending with the user); each answer is a string or a list of assistant
  message(s). An answer list that repeats the prompt's turns first (UltraFeedback, Anthropic HH as
  TRL publishes them) has them stripped, so both styles give the same pair.
* `preference_openai`: {"input": {"messages": [...]}, "preferred_output": [...],
  "non_preferred_output": [...]}, the layout of hosted preference fine-tuning services (and of
  ../shared/data/orca_dpo_pairs.jsonl).

CSV and Parquet hold message lists as JSON strings; they are decoded here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fine_tune.data.formats import BadRow, Format, check_turns, parse_messages, text_field

Messages = list[dict[str, str]]


@dataclass
class Pair:
    where: str
    prompt: Messages  # ends with a user turn
    chosen: Messages  # assistant message(s)
    rejected: Messages


def _messages_or_text(data: dict[str, Any], column: str) -> Messages | str:
    """A message list (also as a JSON string, as CSV/Parquet store it) or plain text."""
    value = data.get(column)
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            decoded = None
        if isinstance(decoded, list) and all(isinstance(m, dict) for m in decoded):
            value = decoded
    if isinstance(value, list | tuple):
        return parse_messages(list(value), column)
    return text_field(data, column, True)


def _prompt(data: dict[str, Any], column: str) -> Messages:
    value = _messages_or_text(data, column)
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return check_turns(value, column, "user")


def _answer(data: dict[str, Any], column: str, prompt: Messages) -> Messages:
    value = _messages_or_text(data, column)
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if value and value[0]["role"] == "system" and prompt[0] == value[0]:
        value = value[1:]
    turns = [m for m in prompt if m["role"] != "system"]
    if value[: len(turns)] == turns and len(value) > len(turns):
        value = value[len(turns) :]  # the answer repeats the conversation before it
    roles = sorted({m["role"] for m in value} - {"assistant"})
    if roles:
        raise BadRow(
            "bad_order",
            f"{column}: expected assistant message(s) after the prompt, found role {roles[0]!r} "
            "(an answer may repeat the whole prompt first, but nothing else)",
        )
    return value


def _openai_prompt(data: dict[str, Any], column: str) -> Messages:
    value = data.get(column)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRow("bad_type", f"field {column!r} is a string that is not JSON") from exc
    if isinstance(value, dict):
        value = value.get("messages")
        column = f"{column}.messages"
    if value is None:
        raise BadRow("missing_field", f"field {column!r} is missing or null")
    return _prompt({column: value}, column)


def to_pair(
    fmt: Format, fields: dict[str, str], data: dict[str, Any], where: str, system_prompt: str | None = None
) -> Pair:
    """One raw row as a Pair; raises BadRow for rows that cannot be trained on."""
    if fmt.name == "preference":
        prompt = _prompt(data, fields["prompt"])
        system = text_field(data, fields["system"], False)
        chosen_col, rejected_col = fields["chosen"], fields["rejected"]
    elif fmt.name == "preference_openai":
        prompt = _openai_prompt(data, fields["input"])
        system = None
        chosen_col, rejected_col = fields["preferred_output"], fields["non_preferred_output"]
    else:  # pragma: no cover - guarded by validate.check_dataset
        raise AssertionError(fmt.name)
    system = system or system_prompt
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return Pair(where, prompt, _answer(data, chosen_col, prompt), _answer(data, rejected_col, prompt))
