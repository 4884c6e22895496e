"""Bad input: each case gives one clear UserError that points at the file/line or the config key."""

from __future__ import annotations

import json

import pytest

from fine_tune.data import build_data
from fine_tune.errors import UserError

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# (case id, file name, file content (str or bytes), extra options, expected `where` suffix, words in message)
CASES = [
    ("missing_file", None, None, {"path": "/nonexistent/train.jsonl"}, "dataset.path", ["file not found"]),
    ("unknown_suffix", "data.txt", "hello", {}, "data.txt", ["suffix"]),
    (
        "malformed_json_line",
        "d.jsonl",
        jsonl(GOOD, GOOD, '{"instruction": "x", "output": }'),
        {},
        "d.jsonl:3",
        ["malformed JSON"],
    ),
    ("line_not_object", "d.jsonl", jsonl(GOOD, "[1, 2]"), {}, "d.jsonl:2", ["JSON object"]),
    ("jsonl_saved_as_json", "d.json", jsonl(GOOD, GOOD), {}, "d.json:2", ["malformed JSON"]),
    (
        "json_array_row_line",
        "d.json",
        json.dumps([GOOD, {"instruction": "x", "output": ""}], indent=2),
        {},
        "d.json:7",  # the line where the bad record opens
        ["empty"],
    ),
    ("json_not_array", "d.json", '"just a string"', {}, "d.json", ["array"]),
    ("not_utf8", "d.jsonl", b'{"instruction": "\xff\xfe"}\n', {}, "d.jsonl", ["UTF-8"]),
    ("bad_parquet", "d.parquet", b"not a parquet file", {}, "d.parquet", ["Parquet"]),
    ("csv_without_header", "d.csv", "", {}, "d.csv", ["header"]),
    (
        "fields_missing",
        "d.jsonl",
        jsonl({"prompt": "a", "completion": "b"}),
        {},
        "d.jsonl",
        ["instruction", "output", "found columns ['completion', 'prompt']"],
    ),
    (
        "empty_string",
        "d.jsonl",
        jsonl(GOOD, {"instruction": "  ", "output": "x"}),
        {},
        "d.jsonl:2",
        ["empty"],
    ),
    (
        "null_field",
        "d.jsonl",
        jsonl(GOOD, {"instruction": "a", "output": None}),
        {},
        "d.jsonl:2",
        ["missing"],
    ),
    ("wrong_type", "d.jsonl", jsonl(GOOD, {"instruction": "a", "output": ["b"]}), {}, "d.jsonl:2", ["list"]),
    (
        "too_long",
        "d.jsonl",
        jsonl(GOOD, {"instruction": "word " * 300, "output": "x"}),
        {},
        "d.jsonl:2",
        ["longer than max_length"],
    ),
    ("empty_file", "d.jsonl", "\n\n", {}, "d.jsonl", ["no rows"]),
    ("unknown_option", "d.jsonl", jsonl(GOOD), {"max_sample": 3}, "dataset.max_sample", ["unknown"]),
    ("unknown_format", "d.jsonl", jsonl(GOOD), {"format": "sharegpt"}, "dataset.format", ["unknown"]),
    ("unknown_template", "d.jsonl", jsonl(GOOD), {"template": "llama"}, "dataset.template", ["unknown"]),
    (
        "unknown_field",
        "d.jsonl",
        jsonl(GOOD),
        {"fields": {"answer": "a"}},
        "dataset.fields.answer",
        ["no field"],
    ),
    (
        "bad_on_bad_row",
        "d.jsonl",
        jsonl(GOOD),
        {"on_bad_row": "ignore"},
        "dataset.on_bad_row",
        ["'error', 'skip'"],
    ),
    ("bad_val_ratio", "d.jsonl", jsonl(GOOD), {"val_ratio": "half"}, "dataset.val_ratio", ["Float"]),
    ("val_ratio_out_of_range", "d.jsonl", jsonl(GOOD), {"val_ratio": 1.5}, "dataset.val_ratio", ["[0, 1)"]),
    ("bad_max_samples", "d.jsonl", jsonl(GOOD), {"max_samples": 0}, "dataset.max_samples", ["positive"]),
    ("bad_encoder", "d.jsonl", jsonl(GOOD), {"encoder": "tiktoken"}, "dataset.encoder", ["'sentencepiece'"]),
    ("no_path", None, None, {"path": None}, "dataset.path", ["needs data"]),
    (
        "chat_without_answer",
        "c.jsonl",
        jsonl({"messages": [{"role": "user", "content": "hi"}]}),
        {"format": "chat"},
        "c.jsonl:1",
        ["end with an assistant"],
    ),
    (
        "chat_bad_role",
        "c.jsonl",
        jsonl({"messages": [{"role": "robot", "content": "hi"}]}),
        {"format": "chat"},
        "c.jsonl:1",
        ["role"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_user_error(tmp_path, tok, case):
    _, name, content, options, where, words = case
    opts = {"format": "alpaca", **options}
    if name is not None:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        opts.setdefault("path", str(path))
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as info:
        build_data(opts, tokenizer=tok, max_length=128, cache_dir=cache)
    err = info.value
    assert err.where is not None and err.where.endswith(where), (err.where, str(err))
    for word in words:
        assert word in err.message, err.message
    # nothing is cached from a failed read
    assert not cache.exists() or not any(cache.iterdir())


def test_skip_counts_bad_rows_by_reason(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(
        jsonl(
            GOOD,
            "{not json",
            {"instruction": "", "output": "x"},
            {"instruction": "a"},
            {"instruction": "word " * 300, "output": "x"},
            GOOD,
            {"instruction": "a", "output": 7},  # numbers are accepted as text
        ),
        encoding="utf-8",
    )
    bundle = build_data(format="alpaca", path=str(path), on_bad_row="skip", tokenizer=tok, max_length=128)
    assert bundle.report.rows_dropped == {
        "malformed_json": 1,
        "empty_field": 1,
        "missing_field": 1,
        "too_long": 1,
    }
    assert bundle.report.rows_read == 7 and len(bundle.train) == 3
    text = bundle.report.format()
    assert "malformed_json: 1" in text and "d.jsonl:2" in text


def test_empty_after_filtering(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(
        jsonl({"instruction": "", "output": "x"}, {"instruction": "a", "output": " "}), encoding="utf-8"
    )
    with pytest.raises(UserError, match="no training rows left"):
        build_data(format="alpaca", path=str(path), on_bad_row="skip", tokenizer=tok, max_length=128)


def test_truncate_and_drop_policies(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    long_prompt = {"instruction": "word " * 300, "output": "x"}
    long_answer = {"instruction": "Count.", "output": "one two three " * 60}
    path.write_text(jsonl(GOOD, long_prompt, long_answer), encoding="utf-8")
    dropped = build_data(format="alpaca", path=str(path), truncation="drop", tokenizer=tok, max_length=64)
    assert len(dropped.train) == 1 and dropped.report.rows_dropped == {"too_long": 2}
    # truncate: the long answer is cut to max_length; the long prompt leaves nothing to train: an error ...
    with pytest.raises(UserError, match="no completion tokens") as info:
        build_data(format="alpaca", path=str(path), truncation="truncate", tokenizer=tok, max_length=64)
    assert info.value.where.endswith("d.jsonl:2")
    # ... or, with skip, a counted drop
    cut = build_data(
        format="alpaca",
        path=str(path),
        truncation="truncate",
        on_bad_row="skip",
        tokenizer=tok,
        max_length=64,
    )
    assert len(cut.train) == 2 and [len(r["input_ids"]) for r in cut.train][1] == 64
    assert cut.report.truncated == 2 and cut.report.rows_dropped == {"no_trained_tokens": 1}
    assert cut.report.token_lengths["max"] > 64  # percentiles describe the data before truncation
