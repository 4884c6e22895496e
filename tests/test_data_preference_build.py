"""Preference pairs as a data set: length policies, bad rows with file:line, identical answers, the
report's numbers, caching, splits and caps."""

from __future__ import annotations

import json

import pytest
from helpers import FIXTURES

import fine_tune.data.templates as templates
from fine_tune.data import build_data, build_preference_data
from fine_tune.data.report import percentiles
from fine_tune.errors import UserError

END_INST = [733, 28748, 16289, 28793]  # "▁[/INST]" in Mistral v1: what every prompt ends with


def pair(i: int, prompt_words: int = 3, answer_words: int = 3) -> dict:
    return {
        "prompt": f"Question {i}: " + "word " * prompt_words,
        "chosen": f"Good answer {i}. " + "yes " * answer_words,
        "rejected": f"Bad answer {i}. " + "no " * answer_words,
    }


def write(path, *rows) -> str:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def build(path, tok, max_length=128, **options):
    return build_preference_data(
        format="preference", path=str(path), tokenizer=tok, max_length=max_length, **options
    )


def rows(ds) -> list[tuple]:
    return [(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"])) for r in ds]


# ----------------------------------------------------------------------------------------------------
# Length policies


def test_error_policy_names_the_pair(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", pair(0), pair(1, prompt_words=200))
    with pytest.raises(UserError) as info:
        build(path, tok)
    assert info.value.where.endswith("d.jsonl:2") and "longer than max_length=128" in info.value.message
    assert "truncation=truncate" in info.value.hint


def test_drop_policy_counts_what_it_drops(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", pair(0), pair(1, prompt_words=200), pair(2, answer_words=200))
    for options in ({"truncation": "drop"}, {"on_bad_row": "skip"}):
        bundle = build(path, tok, **options)
        assert len(bundle.train) == 1 and bundle.report.rows_dropped == {"too_long": 2}, options


def test_truncate_cuts_the_prompt_first_keeping_bos_and_its_end(tmp_path, tok):
    long_prompt, long_answers = pair(1, prompt_words=200), pair(2, answer_words=200)
    both = pair(3, prompt_words=200, answer_words=200)
    path = write(tmp_path / "d.jsonl", pair(0), long_prompt, long_answers, both)
    full = build(path, tok, max_length=1024)
    cut = build(path, tok, truncation="truncate", max_prompt_length=40)
    assert cut.report.truncated == 3 and cut.report.max_prompt_length == 40
    assert rows(cut.train)[0] == rows(full.train)[0]  # a pair that fits is untouched
    for row in list(cut.train)[1:]:  # cut ones fill max_length exactly: nothing cut that fitted
        assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) == 128
    # a long prompt before short answers: cut only as far as they need, BOS and its end kept
    before, after = full.train[1], cut.train[1]
    keep = 128 - max(len(before["chosen_ids"]), len(before["rejected_ids"]))
    assert after["prompt_ids"] == [tok.bos_token_id] + before["prompt_ids"][-(keep - 1) :]
    assert after["prompt_ids"][-4:] == END_INST
    assert (after["chosen_ids"], after["rejected_ids"]) == (before["chosen_ids"], before["rejected_ids"])
    # long answers after a short prompt: the prompt stays, the answers' ends go
    before, after = full.train[2], cut.train[2]
    room = 128 - len(before["prompt_ids"])
    assert after["prompt_ids"] == before["prompt_ids"]
    assert (after["chosen_ids"], after["rejected_ids"]) == (
        before["chosen_ids"][:room],
        before["rejected_ids"][:room],
    )
    # both long: the prompt down to max_prompt_length, the answers to what is left
    before, after = full.train[3], cut.train[3]
    assert after["prompt_ids"] == [tok.bos_token_id] + before["prompt_ids"][-39:]
    assert (
        after["chosen_ids"] == before["chosen_ids"][:88]
        and after["rejected_ids"] == before["rejected_ids"][:88]
    )
    # lengths in the report describe the pairs as read, before truncation
    assert cut.report.prompt_lengths["max"] == len(full.train[3]["prompt_ids"])


def test_truncate_with_default_prompt_budget_of_half_max_length(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", pair(0, prompt_words=300, answer_words=300))
    cut = build(path, tok, truncation="truncate")
    row = cut.train[0]
    assert cut.report.max_prompt_length == 64 and len(row["prompt_ids"]) == 64
    assert len(row["chosen_ids"]) == len(row["rejected_ids"]) == 64


def test_prompt_budget_must_leave_room_for_answers(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", pair(0))
    with pytest.raises(UserError) as info:
        build(path, tok, max_prompt_length=128)
    assert info.value.where == "dataset.max_prompt_length"


# ----------------------------------------------------------------------------------------------------
# Identical answers


def test_identical_answers_are_dropped_and_counted(tmp_path, tok):
    same = {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "Hi."}
    # identical only within the first 20 answer tokens: identical once truncated
    prefix = "one two three four five six seven eight nine ten " * 3
    late = {"prompt": "Count.", "chosen": prefix + "eleven", "rejected": prefix + "twelve"}
    path = write(tmp_path / "d.jsonl", pair(0), same, late)
    bundle = build(path, tok, max_length=32, truncation="truncate", max_prompt_length=12)
    assert len(bundle.train) == 1 and bundle.report.rows_dropped == {"identical_answers": 2}
    assert bundle.report.identical_pairs == 2 and bundle.report.to_dict()["identical_pairs"] == 2
    assert "identical chosen and rejected 2 (dropped)" in bundle.report.format()
    assert any("after truncation" in e and "d.jsonl:3" in e for e in bundle.report.dropped_examples)
    with pytest.raises(UserError, match="no training pairs left"):
        build(write(tmp_path / "same.jsonl", same), tok)


# ----------------------------------------------------------------------------------------------------
# Bad rows

GOOD = pair(0)
CASES = [
    # (case id, file name, content, options, expected `where` suffix, words in the message)
    (
        "missing_column",
        "d.jsonl",
        [{"prompt": "a", "chosen": "b"}],
        {},
        "d.jsonl",
        ["rejected", "found columns"],
    ),
    ("empty_answer", "d.jsonl", [GOOD, {**GOOD, "rejected": "  "}], {}, "d.jsonl:2", ["empty"]),
    ("null_prompt", "d.jsonl", [GOOD, {**GOOD, "prompt": None}], {}, "d.jsonl:2", ["missing"]),
    (
        "answer_is_a_number_list",
        "d.jsonl",
        [GOOD, {**GOOD, "chosen": [1, 2]}],
        {},
        "d.jsonl:2",
        ["not an object"],
    ),
    (
        "prompt_ends_with_assistant",
        "d.jsonl",
        [GOOD, {**GOOD, "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
        {},
        "d.jsonl:2",
        ["prompt must end with a user"],
    ),
    (
        "answer_with_a_user_turn",
        "d.jsonl",
        [GOOD, {**GOOD, "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}],
        {},
        "d.jsonl:2",
        ["expected assistant message(s)"],
    ),
    ("malformed_line", "d.jsonl", [GOOD, '{"prompt": '], {}, "d.jsonl:2", ["malformed JSON"]),
    (
        "openai_without_messages",
        "o.jsonl",
        [{"input": {"tools": []}, "preferred_output": "a", "non_preferred_output": "b"}],
        {"format": "preference_openai"},
        "o.jsonl:1",
        ["input.messages", "missing"],
    ),
    ("sft_format", "d.jsonl", [GOOD], {"format": "alpaca"}, "dataset.format", ["build_preference_data"]),
    ("unknown_option", "d.jsonl", [GOOD], {"train_on_inputs": True}, "dataset.train_on_inputs", ["unknown"]),
    ("packing", "d.jsonl", [GOOD], {"packing": True}, "dataset.packing", ["packing"]),
    ("raw_text_template", "d.jsonl", [GOOD], {"template": "none"}, "dataset.template", ["template none"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_user_error(tmp_path, tok, case):
    _, name, content, options, where, words = case
    options = {"format": "preference", **options}
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as info:
        build_preference_data(
            path=write(tmp_path / name, *content), tokenizer=tok, max_length=128, cache_dir=cache, **options
        )
    assert info.value.where.endswith(where), (info.value.where, info.value.message)
    for word in words:
        assert word in info.value.message, info.value.message
    assert not cache.exists() or not any(cache.iterdir())


def test_bad_csv_row_points_at_its_line(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\nHi,"Hello\nthere",Go away\nAsk,,Nothing\n', encoding="utf-8")
    with pytest.raises(UserError) as info:
        build(path, tok)
    assert info.value.where.endswith("d.csv:4")  # the quoted cell spans lines 2-3


def test_skip_counts_bad_rows_by_reason(tmp_path, tok):
    path = write(
        tmp_path / "d.jsonl", GOOD, "{nope", {**GOOD, "chosen": ""}, {"prompt": "a", "chosen": "b"}, pair(5)
    )
    bundle = build(path, tok, on_bad_row="skip")
    assert bundle.report.rows_read == 5 and len(bundle.train) == 2
    assert bundle.report.rows_dropped == {"malformed_json": 1, "empty_field": 1, "missing_field": 1}
    assert "d.jsonl:2" in bundle.report.format()


def test_sft_builder_points_preference_formats_elsewhere(tok):
    with pytest.raises(UserError) as info:
        build_data(format="preference", path=str(FIXTURES / "preference.jsonl"), tokenizer=tok)
    assert info.value.where == "dataset.format" and "dataset=preference" in info.value.hint


# ----------------------------------------------------------------------------------------------------
# Report, splits, cache


def test_report_figures(tok):
    bundle = build(FIXTURES / "preference.jsonl", tok, max_length=512)
    rep = bundle.report.to_dict()
    data = bundle.train
    p, c, r = ([len(x) for x in data[col]] for col in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert rep["rows_read"] == 6 and rep["train_examples"] == 6 and rep["rows_dropped"] == {}
    assert rep["prompt_lengths"] == percentiles(p) and rep["chosen_lengths"] == percentiles(c)
    assert rep["rejected_lengths"] == percentiles(r)
    assert rep["trained_tokens"] == sum(c) + sum(r) and rep["total_tokens"] == 2 * sum(p) + sum(c) + sum(r)
    assert rep["template"] == "mistral_v1" and rep["truncated"] == 0
    text = bundle.report.format()
    assert "pairs read 6; dropped 0" in text and f"p50 {percentiles(p)['p50']:.0f}" in text


def test_seeded_split_caps_and_files(tmp_path, tok):
    path = write(tmp_path / "t.jsonl", *(pair(i) for i in range(40)))
    a = build(path, tok, val_ratio=0.25, seed=3)
    b = build(path, tok, val_ratio=0.25, seed=3)
    c = build(path, tok, val_ratio=0.25, seed=4)
    assert (len(a.train), len(a.eval)) == (30, 10) and rows(a.eval) == rows(b.eval)
    assert set(rows(a.eval)) != set(rows(c.eval)) and not set(rows(a.train)) & set(rows(a.eval))
    assert all(p["prompt_ids"] in a.eval["prompt_ids"] for p in a.prompts) and len(a.prompts) == 4
    val = write(tmp_path / "v.jsonl", *(pair(i) for i in range(100, 108)))
    test = write(tmp_path / "x.jsonl", *(pair(i) for i in range(200, 203)))
    d = build(path, tok, validation_path=val, test_path=test, max_samples=5, max_eval_samples=3)
    assert (len(d.train), len(d.eval), len(d.test)) == (5, 3, 3)
    assert "Question 100" in tok.decode(d.eval[0]["prompt_ids"]) and "Question 0" in tok.decode(
        d.train[0]["prompt_ids"]
    )
    assert d.report.rows_read == 40 + 8 + 3 and ", test 3" in d.report.format()


def test_second_build_comes_from_cache_without_encoding(tmp_path, tok, monkeypatch):
    path = write(tmp_path / "t.jsonl", *(pair(i) for i in range(12)))
    opts = {"format": "preference", "path": path, "val_ratio": 0.25}
    first = build_preference_data(opts, tokenizer=tok, max_length=64, cache_dir=tmp_path / "cache")
    assert not first.report.from_cache and len(list((tmp_path / "cache").iterdir())) == 1

    def boom(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(templates, "encode_examples", boom)
    monkeypatch.setattr(templates, "encode_prompts", boom)
    again = build_preference_data(opts, tokenizer=tok, max_length=64, cache_dir=tmp_path / "cache")
    assert again.report.from_cache and again.kind == "preference" and again.collator is None
    assert rows(again.train) == rows(first.train) and rows(again.eval) == rows(first.eval)
    assert again.prompts == first.prompts
    assert again.report.to_dict() | {"from_cache": False, "seconds": 0} == first.report.to_dict() | {
        "seconds": 0
    }


@pytest.mark.parametrize("change", ["max_length", "max_prompt_length", "truncation", "file", "template"])
def test_cache_key_follows_what_changes_the_ids(tmp_path, tok, change):
    path = write(tmp_path / "t.jsonl", *(pair(i) for i in range(6)))
    kwargs = {
        "format": "preference",
        "path": path,
        "tokenizer": tok,
        "max_length": 64,
        "cache_dir": tmp_path / "c",
    }
    build_preference_data(**kwargs)
    if change == "max_length":
        kwargs["max_length"] = 48
    elif change == "max_prompt_length":
        kwargs["max_prompt_length"] = 20
    elif change == "truncation":
        kwargs["truncation"] = "drop"
    elif change == "file":
        write(tmp_path / "t.jsonl", *(pair(i) for i in range(1, 7)))
    else:
        kwargs["template"] = "chatml"
    assert not build_preference_data(**kwargs).report.from_cache
    assert len(list((tmp_path / "c").iterdir())) == 2
