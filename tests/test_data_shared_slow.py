"""Every row of the real public data in ../shared/data, tokenized with the Mistral tokenizer and checked
token for token against mistral-common (slow: ~10,600 rows and 284 preference pairs)."""

from __future__ import annotations

import json

import pytest
from helpers import SHARED_DATA, mistral_common, mistral_tokenizer, reference

from fine_tune.data import build_data, build_preference_data

FILES = ["gsm8k_train.alpaca.json", "gpteacher_roleplay.alpaca.json"]
PAIRS = "orca_dpo_pairs.jsonl"
IGNORE = -100

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared():
    missing = [f for f in [*FILES, PAIRS] if not (SHARED_DATA / f).is_file()]
    if missing:
        pytest.skip(
            f"shared data not found: {[str(SHARED_DATA / f) for f in missing]} (expected next to the repo)"
        )
    return [SHARED_DATA / f for f in FILES]


def test_all_shared_rows_tokenize_exactly_like_mistral_common(shared):
    tok = mistral_tokenizer()
    bundle = build_data(
        format="alpaca", path=[str(p) for p in shared], template="mistral", tokenizer=tok, max_length=512
    )
    raw = [row for p in shared for row in json.loads(p.read_text(encoding="utf-8"))]
    assert len(raw) == 10_619
    rep = bundle.report
    assert rep.rows_read == 10_619 and rep.rows_dropped == {} and rep.truncated == 0
    assert len(bundle.train) == 10_619 and bundle.eval is None
    assert rep.token_lengths["max"] <= 512

    sentencepiece = mistral_common("v1").instruct_tokenizer.tokenizer
    ids_col, labels_col = bundle.train["input_ids"], bundle.train["labels"]
    mismatches = []
    for i, row in enumerate(raw):
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
        expected = reference("v1", [("user", user), ("assistant", row["output"])])
        answer = sentencepiece.encode(row["output"], bos=False, eos=True)
        n = len(answer)
        ok = ids_col[i] == expected and labels_col[i] == [IGNORE] * (len(expected) - n) + answer
        if not ok:
            mismatches.append(i)
    assert not mismatches, f"{len(mismatches)} rows differ, first {mismatches[:5]}"


def test_all_shared_pairs_tokenize_exactly_like_mistral_common(shared):
    tok = mistral_tokenizer()
    path = SHARED_DATA / PAIRS
    bundle = build_preference_data(format="preference_openai", path=str(path), tokenizer=tok, max_length=4096)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rep = bundle.report
    assert len(raw) == 284 and rep.rows_read == 284 and rep.rows_dropped == {} and rep.truncated == 0
    assert len(bundle.train) == 284 and bundle.eval is None
    mismatches = []
    for i, (row, pair) in enumerate(zip(raw, bundle.train, strict=True)):
        prompt = [(m["role"], m["content"]) for m in row["input"]["messages"]]
        chosen = [(m["role"], m["content"]) for m in row["preferred_output"]]
        rejected = [(m["role"], m["content"]) for m in row["non_preferred_output"]]
        ok = (
            pair["prompt_ids"] == reference("v1", prompt[:-1], final_user=prompt[-1][1])
            and pair["prompt_ids"] + pair["chosen_ids"] == reference("v1", prompt + chosen)
            and pair["prompt_ids"] + pair["rejected_ids"] == reference("v1", prompt + rejected)
        )
        if not ok:
            mismatches.append(i)
    assert not mismatches, f"{len(mismatches)} pairs differ, first {mismatches[:5]}"
