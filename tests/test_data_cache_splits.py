"""Preprocessing cache (a sweep tokenizes once), splits, sample caps and the data report's numbers."""

from __future__ import annotations

import json

import pytest
from helpers import FIXTURES, mistral_tokenizer

import fine_tune.data.templates as templates
from fine_tune.data import build_data
from fine_tune.data.report import percentiles

IGNORE = -100


def write_rows(path, n: int, start: int = 0) -> None:
    rows = [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} + {i} = {2 * i}."}
        for i in range(start, start + n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def rows_of(ds) -> list[tuple]:
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in ds]


def test_second_build_comes_from_cache_without_tokenizing(tmp_path, tok, monkeypatch):
    path = tmp_path / "d.jsonl"
    write_rows(path, 30)
    opts = {"format": "alpaca", "path": str(path), "val_ratio": 0.2}
    first = build_data(opts, tokenizer=tok, max_length=64, cache_dir=tmp_path / "cache")
    assert not first.report.from_cache
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").exists()  # complete entry, no temp dirs left

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(templates, "encode_examples", boom)
    second = build_data(opts, tokenizer=tok, max_length=64, cache_dir=tmp_path / "cache")
    assert second.report.from_cache
    assert rows_of(second.train) == rows_of(first.train) and rows_of(second.eval) == rows_of(first.eval)
    assert second.prompts == first.prompts
    assert second.report.trained_tokens == first.report.trained_tokens


@pytest.mark.parametrize(
    "change",
    ["max_length", "template", "file", "tokenizer", "train_on_inputs", "packing", "seed"],
)
def test_cache_key_changes_with_what_changes_the_ids(tmp_path, tok, change):
    path = tmp_path / "d.jsonl"
    write_rows(path, 10)
    kwargs = {
        "format": "alpaca",
        "path": str(path),
        "tokenizer": tok,
        "max_length": 64,
        "seed": 1,
        "val_ratio": 0.2,
        "cache_dir": tmp_path / "cache",
    }
    build_data(**kwargs)
    if change == "max_length":
        kwargs["max_length"] = 48
    elif change == "template":
        kwargs["template"] = "chatml"
    elif change == "file":
        write_rows(path, 10, start=1)
    elif change == "tokenizer":
        kwargs["tokenizer"] = mistral_tokenizer("v3")
    elif change == "train_on_inputs":
        kwargs["train_on_inputs"] = True
    elif change == "packing":
        kwargs["packing"] = True
    else:
        kwargs["seed"] = 2
    again = build_data(**kwargs)
    assert not again.report.from_cache
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_damaged_cache_entry_is_rebuilt(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    write_rows(path, 10)
    first = build_data(
        format="alpaca", path=str(path), tokenizer=tok, max_length=64, cache_dir=tmp_path / "c"
    )
    entry = next((tmp_path / "c").iterdir())
    for f in (entry / "train").iterdir():
        if f.suffix == ".arrow":
            f.write_bytes(b"garbage")
    again = build_data(
        format="alpaca", path=str(path), tokenizer=tok, max_length=64, cache_dir=tmp_path / "c"
    )
    assert not again.report.from_cache and rows_of(again.train) == rows_of(first.train)


def test_seeded_ratio_split_is_disjoint_and_reproducible(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    write_rows(path, 50)
    a = build_data(format="alpaca", path=str(path), val_ratio=0.2, seed=3, tokenizer=tok, max_length=64)
    b = build_data(format="alpaca", path=str(path), val_ratio=0.2, seed=3, tokenizer=tok, max_length=64)
    c = build_data(format="alpaca", path=str(path), val_ratio=0.2, seed=4, tokenizer=tok, max_length=64)
    assert len(a.train) == 40 and len(a.eval) == 10
    assert rows_of(a.eval) == rows_of(b.eval)
    assert set(rows_of(a.eval)) != set(rows_of(c.eval))
    assert not set(rows_of(a.train)) & set(rows_of(a.eval))
    assert set(rows_of(a.train)) | set(rows_of(a.eval)) == set(rows_of(c.train)) | set(rows_of(c.eval))
    # generation prompts come from the held-out rows
    eval_prompts = {
        tuple(r["input_ids"][: r["labels"].index(next(t for t in r["labels"] if t != IGNORE))])
        for r in a.eval
    }
    assert all(tuple(p["prompt_ids"]) in eval_prompts for p in a.prompts) and len(a.prompts) == 4


def test_validation_file_and_caps(tmp_path, tok):
    train, val = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    write_rows(train, 20)
    write_rows(val, 8, start=100)
    bundle = build_data(
        format="alpaca",
        path=str(train),
        validation_path=str(val),
        max_samples=5,
        max_eval_samples=3,
        tokenizer=tok,
        max_length=64,
    )
    assert len(bundle.train) == 5 and len(bundle.eval) == 3
    assert "100 plus 100" in tok.decode(bundle.eval[0]["input_ids"])
    assert "0 plus 0" in tok.decode(bundle.train[0]["input_ids"])  # caps keep file order


def test_report_figures(tmp_path, tok):
    bundle = build_data(format="alpaca", path=str(FIXTURES / "alpaca.jsonl"), tokenizer=tok, max_length=128)
    rep = bundle.report.to_dict()
    lengths = [len(r["input_ids"]) for r in bundle.train]
    trained = sum(sum(1 for t in r["labels"] if t != IGNORE) for r in bundle.train)
    assert rep["rows_read"] == 6 and rep["train_examples"] == 6 and rep["rows_dropped"] == {}
    assert rep["total_tokens"] == sum(lengths) and rep["trained_tokens"] == trained
    assert rep["trained_share"] == pytest.approx(trained / sum(lengths), abs=1e-4)
    assert rep["token_lengths"]["max"] == max(lengths) and rep["token_lengths"]["min"] == min(lengths)
    text = bundle.report.format()
    assert f"tokens {sum(lengths):,}" in text and "dropped 0" in text


def test_percentiles_nearest_rank():
    values = list(range(1, 101))
    p = percentiles(values)
    assert (p["p50"], p["p90"], p["p99"], p["max"], p["mean"]) == (50, 90, 99, 100, 50.5)
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p95": 7, "p99": 7, "min": 7, "max": 7, "mean": 7}


def test_test_file_is_kept_apart_and_cached(tmp_path, tok):
    train, test = tmp_path / "t.jsonl", tmp_path / "x.jsonl"
    write_rows(train, 20)
    write_rows(test, 6, start=500)
    opts = {"format": "alpaca", "path": str(train), "test_path": str(test), "val_ratio": 0.1}
    first = build_data(opts, tokenizer=tok, max_length=64, packing=True, cache_dir=tmp_path / "c")
    assert len(first.test) == 6 and first.report.test_examples == 6 and first.report.rows_read == 26
    assert "position_ids" not in first.test.column_names  # never packed: one row per test example
    assert "500 plus 500" in tok.decode(first.test[0]["input_ids"])
    train_text = " ".join(tok.decode(r["input_ids"]) for r in first.train)
    assert "500 plus" not in train_text
    again = build_data(opts, tokenizer=tok, max_length=64, packing=True, cache_dir=tmp_path / "c")
    assert again.report.from_cache and rows_of(again.test) == rows_of(first.test)
    assert ", test 6" in again.report.format()
