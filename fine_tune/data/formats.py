"""Data shapes people fine-tune on, each turned into one conversation (or one text) per row.

Everything downstream (templates, masking, packing) works on `Example`, so a new shape only has to
say which fields it needs and how they become messages. Field names are remappable because public
datasets disagree on them (`output` vs `response` vs `answer`). Preference-pair shapes are declared
here too (kind "preference", one registry for every format name); `pairs.py` turns their rows into
pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fine_tune.errors import UserError
from fine_tune.schema import DatasetSchema, PreferenceDatasetSchema, default


@dataclass
class Example:
    """A conversation (`messages`) or, for continued pre-training, a raw `text`."""

    where: str
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None


class BadRow(Exception):
    """A row that cannot be used; `reason` is the key counted in the data report."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]  # of DEFAULT_FIELDS[name]; the others there are optional
    default_template: str = "auto"
    kind: str = "sft"  # sft: a conversation per row (build_data); preference: a pair (BUILDERS)


FORMATS: dict[str, Format] = {
    "alpaca": Format("alpaca", ("instruction", "output")),
    "dolly": Format("dolly", ("instruction", "response")),
    "qa": Format("qa", ("question", "answer"), default_template="qa"),
    "law_title": Format("law_title", ("body", "title")),
    "text": Format("text", ("text",), default_template="none"),
    "chat": Format("chat", ("messages",)),
    "preference": Format("preference", ("prompt", "chosen", "rejected"), kind="preference"),
    "preference_openai": Format(
        "preference_openai", ("input", "preferred_output", "non_preferred_output"), kind="preference"
    ),
}
# The builder of each kind of data (`DataBundle.kind`), by the `_target_` its schema gives it.
BUILDERS = {
    "sft": default(DatasetSchema, "_target_"),
    "preference": default(PreferenceDatasetSchema, "_target_"),
}
SAMPLE = "sample"  # build_data's shipped instruction data, in the alpaca format
# Column names as they appear in the public datasets each format is named after.
DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system"},
    "dolly": {"instruction": "instruction", "context": "context", "response": "response", "system": "system"},
    "qa": {"question": "input", "answer": "output", "system": "system"},
    "law_title": {"body": "question_body", "title": "question_title", "system": "system"},
    "text": {"text": "text"},
    "chat": {"messages": "messages", "system": "system"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system"},
    "preference_openai": {
        "input": "input",  # {"messages": [...]} or the message list itself
        "preferred_output": "preferred_output",
        "non_preferred_output": "non_preferred_output",
    },
}
LAW_TITLE_INSTRUCTION = "Write a short, specific title for this legal question."
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


def get_format(name: str, kind: str = "sft") -> Format | None:
    """The format `name` as the builder of `kind` reads it; None when there is none. Which formats a
    builder accepts, and field names, are checked in `fine_tune.validate.check_dataset`."""
    return FORMATS.get("alpaca" if name == SAMPLE and kind == "sft" else name)


def format_names(kind: str) -> list[str]:
    """The formats the builder of `kind` reads."""
    return sorted(n for n, f in FORMATS.items() if f.kind == kind) + ([SAMPLE] if kind == "sft" else [])


def resolve_fields(fmt: Format, fields: dict[str, str] | None) -> dict[str, str]:
    """The user's remapping (checked: `validate.check_dataset`) over the format's column names."""
    merged = dict(DEFAULT_FIELDS[fmt.name])
    merged.update({key: str(column) for key, column in (fields or {}).items() if column is not None})
    return merged


def check_columns(fmt: Format, fields: dict[str, str], columns: set[str], where: str) -> None:
    """Fail once per file, naming what was found and what was expected, instead of once per row."""
    missing = [f"{k} (column {fields[k]!r})" for k in fmt.required if fields[k] not in columns]
    if missing:
        remap = " ".join(f"dataset.fields.{k}=<column>" for k in fmt.required if fields[k] not in columns)
        raise UserError(
            f"required fields missing for format {fmt.name!r}: {', '.join(missing)}; "
            f"found columns {sorted(columns)}; expected {sorted(fields[k] for k in fmt.required)}",
            where=where,
            hint=f"remap with {remap}, or pick the dataset format that matches the file",
        )


def text_field(data: dict[str, Any], column: str, required: bool) -> str | None:
    value = data.get(column)
    if value is None:
        if required:
            raise BadRow("missing_field", f"field {column!r} is missing or null")
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRow("bad_type", f"field {column!r} is a {type(value).__name__}, expected a string")
    if not value.strip():
        if required:
            raise BadRow("empty_field", f"field {column!r} is empty")
        return None
    return value


def _join(first: str, second: str | None) -> str:
    return first if not second else f"{first}\n\n{second}"


def to_example(
    fmt: Format,
    fields: dict[str, str],
    data: dict[str, Any],
    where: str,
    system_prompt: str | None = None,
    instruction: str | None = None,
) -> Example:
    """Turn one raw row into an Example; raises BadRow for rows that cannot be trained on."""
    if fmt.name == "text":
        return Example(where, text=text_field(data, fields["text"], True))
    system = text_field(data, fields["system"], False) if "system" in fields else None
    system = system or system_prompt
    if fmt.name == "chat":
        column = fields["messages"]
        messages = check_turns(parse_messages(data.get(column), column), column, "assistant")
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return Example(where, messages=messages)
    if fmt.name == "alpaca":
        user = _join(text_field(data, fields["instruction"], True), text_field(data, fields["input"], False))
        answer = text_field(data, fields["output"], True)
    elif fmt.name == "dolly":
        user = _join(
            text_field(data, fields["instruction"], True), text_field(data, fields["context"], False)
        )
        answer = text_field(data, fields["response"], True)
    elif fmt.name == "qa":
        user, answer = text_field(data, fields["question"], True), text_field(data, fields["answer"], True)
    elif fmt.name == "law_title":
        user = _join(instruction or LAW_TITLE_INSTRUCTION, text_field(data, fields["body"], True))
        answer = text_field(data, fields["title"], True)
    else:  # pragma: no cover - guarded by validate.check_dataset
        raise AssertionError(fmt.name)
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Example(where, messages=messages)


def parse_messages(value: Any, column: str) -> list[dict[str, str]]:
    """A list of {role, content} (or ShareGPT's {from, value}), or a JSON string of one, checked and
    normalised: known roles only, non-empty text, system first, same-role runs merged."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)  # CSV/Parquet often hold the list as a JSON string
        except json.JSONDecodeError as exc:
            raise BadRow("bad_type", f"field {column!r} is a string that is not a JSON list") from exc
    if not isinstance(value, list) or not value:
        raise BadRow(
            "missing_field" if not value else "bad_type", f"field {column!r} must be a non-empty list"
        )
    messages: list[dict[str, str]] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise BadRow("bad_type", f"{column}[{i}] is not an object")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        role = ROLE_ALIASES.get(str(role).lower()) if role is not None else None
        if role is None:
            raise BadRow(
                "bad_role",
                f"{column}[{i}] has role {msg.get('role', msg.get('from'))!r}; "
                "expected system/user/assistant",
            )
        if not isinstance(content, str) or not content.strip():
            raise BadRow("empty_field", f"{column}[{i}] ({role}) has empty content")
        if role == "system" and i != 0:
            raise BadRow("bad_order", f"{column}[{i}]: a system message must come first")
        if messages and messages[-1]["role"] == role and role != "system":
            # Merge consecutive same-role turns as mistral-common does, instead of failing.
            messages[-1]["content"] += "\n\n" + content
            continue
        messages.append({"role": role, "content": content})
    return messages


def check_turns(messages: list[dict[str, str]], column: str, last: str) -> list[dict[str, str]]:
    """After any system message the user speaks first; the last turn is `last`'s (the assistant
    for a training conversation, the user for a prompt)."""
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[0]["role"] != "user":
        raise BadRow("bad_order", f"{column}: the first non-system message must be from the user")
    if turns[-1]["role"] != last:
        if last == "assistant":
            raise BadRow(
                "no_assistant_turn", f"{column}: the conversation must end with an assistant message"
            )
        raise BadRow("bad_order", f"{column}: the prompt must end with a {last} message")
    return messages
