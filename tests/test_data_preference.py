"""Preference pairs: every layout and file type reads, and renders token for token as mistral-common
encodes the conversation (prompt up to the answer; each answer through its EOS)."""

from __future__ import annotations

import json

import pytest
from helpers import FIXTURES, mistral_tokenizer, reference

from fine_tune.data import build_preference_data

# fixture file -> dataset.format
LAYOUTS = {
    "preference.jsonl": "preference",
    "preference_chat.jsonl": "preference",
    "preference_openai.jsonl": "preference_openai",
}
ROLES = {"human": "user", "gpt": "assistant"}


def rows_of(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


def turns(value, role: str) -> list[tuple[str, str]]:
    """(role, content) turns of a raw field: a string is one turn of `role`."""
    if isinstance(value, str):
        return [(role, value)]
    return [
        (
            ROLES.get(m.get("role", m.get("from")), m.get("role", m.get("from"))),
            m.get("content", m.get("value")),
        )
        for m in value
    ]


def conversation(row: dict) -> tuple[list, list, list]:
    """What each raw fixture row means, written out independently of the reader: (prompt, chosen,
    rejected) turns, answers without any repeat of the prompt."""
    if "input" in row:
        prompt = turns(row["input"]["messages"], "user")
        answers = row["preferred_output"], row["non_preferred_output"]
    else:
        prompt = ([("system", row["system"])] if "system" in row else []) + turns(row["prompt"], "user")
        answers = row["chosen"], row["rejected"]
    out = []
    for answer in answers:
        t = turns(answer, "assistant")
        out.append(t[len(prompt) :] if t[: len(prompt)] == prompt else t)
    return prompt, out[0], out[1]


def build(name: str, tokenizer, **options):
    return build_preference_data(
        format=LAYOUTS.get(name, "preference"),
        path=str(FIXTURES / name),
        tokenizer=tokenizer,
        max_length=512,
        **options,
    )


@pytest.mark.parametrize("version", ["v1", "v3", "v7"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_pairs_match_mistral_common(name, version):
    tokenizer = mistral_tokenizer(version)
    bundle = build(name, tokenizer, template="mistral")
    raw = rows_of(name)
    assert bundle.kind == "preference" and bundle.collator is None
    assert bundle.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert len(bundle.train) == len(raw) and bundle.report.template == f"mistral_{version}"
    end_inst = (
        tokenizer.convert_tokens_to_ids("[/INST]")
        if version != "v1"
        else tokenizer.convert_tokens_to_ids("]")
    )
    for row, pair in zip(raw, bundle.train, strict=True):
        prompt, chosen, rejected = conversation(row)
        # the prompt is what mistral-common serves for this conversation
        assert pair["prompt_ids"] == reference(version, prompt[:-1], final_user=prompt[-1][1])
        assert pair["prompt_ids"][0] == tokenizer.bos_token_id and pair["prompt_ids"][-1] == end_inst
        # prompt + answer is the training conversation; the answer ends with the EOS
        assert pair["prompt_ids"] + pair["chosen_ids"] == reference(version, prompt + chosen)
        assert pair["prompt_ids"] + pair["rejected_ids"] == reference(version, prompt + rejected)
        assert pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == tokenizer.eos_token_id
        earlier_answers = sum(role == "assistant" for role, _ in prompt)
        assert pair["prompt_ids"].count(tokenizer.eos_token_id) == earlier_answers


def test_answer_ids_are_exactly_the_answer_text(tok):
    """Nothing of the prompt leaks into an answer: chosen_ids is the answer's own encoding + EOS."""
    from helpers import mistral_common

    sentencepiece = mistral_common("v1").instruct_tokenizer.tokenizer
    bundle = build("preference.jsonl", tok)
    for row, pair in zip(rows_of("preference.jsonl"), bundle.train, strict=True):
        assert pair["chosen_ids"] == sentencepiece.encode(row["chosen"], bos=False, eos=True)
        assert pair["rejected_ids"] == sentencepiece.encode(row["rejected"], bos=False, eos=True)


def test_repeated_prompt_and_message_lists_equal_plain_strings(tmp_path, tok):
    """UltraFeedback's answers (the prompt repeated as a user turn) and message lists give the same
    ids as the plain-string layout."""
    plain = {"prompt": "Give one word for 'very big'.", "chosen": "Huge.", "rejected": "Small."}
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps(plain) + "\n", encoding="utf-8")
    chat = build("preference_chat.jsonl", tok)
    assert (
        build_preference_data(format="preference", path=str(path), tokenizer=tok, max_length=512).train[0]
        == chat.train[2]
    )


def test_every_file_type_gives_the_same_pairs(tmp_path, tok):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    def cells(row):  # CSV holds message lists as JSON strings
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()}

    reference_ids = {}
    for name in ("preference.jsonl", "preference_chat.jsonl"):
        rows = rows_of(name)
        reference_ids[name] = build(name, tok).train[:]
        stem = tmp_path / name.removesuffix(".jsonl")
        (stem.with_suffix(".json")).write_text(json.dumps(rows), encoding="utf-8")
        columns = sorted({k for r in rows for k in r})
        with open(stem.with_suffix(".csv"), "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(cells(r) for r in rows)
        for suffix in (".json", ".csv"):
            got = build_preference_data(
                format="preference", path=str(stem.with_suffix(suffix)), tokenizer=tok, max_length=512
            )
            assert got.train[:] == reference_ids[name], (name, suffix)
    # Parquet: nested message lists stored natively (the list-prompt rows of the chat fixture)
    listed = [r for r in rows_of("preference_chat.jsonl") if isinstance(r["prompt"], list)][:2]
    pq.write_table(pa.Table.from_pylist(listed), tmp_path / "chat.parquet")
    got = build_preference_data(
        format="preference", path=str(tmp_path / "chat.parquet"), tokenizer=tok, max_length=512
    )
    expected = reference_ids["preference_chat.jsonl"]
    assert got.train[:] == {k: v[:2] for k, v in expected.items()}


def test_fields_are_remappable(tmp_path, tok):
    rows = [
        {"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
        for r in rows_of("preference.jsonl")
    ]
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    remapped = build_preference_data(
        format="preference",
        path=str(path),
        fields={"prompt": "question", "chosen": "good", "rejected": "bad"},
        tokenizer=tok,
        max_length=512,
    )
    plain = build("preference.jsonl", tok)
    # row 1 of the fixture has a system column, which the renamed file lacks
    assert [r for i, r in enumerate(remapped.train) if i != 1] == [
        r for i, r in enumerate(plain.train) if i != 1
    ]
    openai = [
        {"conv": r["input"], "a": r["preferred_output"], "b": r["non_preferred_output"]}
        for r in rows_of("preference_openai.jsonl")
    ]
    path = tmp_path / "openai.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in openai), encoding="utf-8")
    fields = {"input": "conv", "preferred_output": "a", "non_preferred_output": "b"}
    got = build_preference_data(
        format="preference_openai", path=str(path), fields=fields, tokenizer=tok, max_length=512
    )
    assert got.train[:] == build("preference_openai.jsonl", tok).train[:]


def test_system_prompt_fills_rows_without_one(tok):
    bundle = build("preference.jsonl", tok, system_prompt="Be brief.")
    texts = [tok.decode(r["prompt_ids"]) for r in bundle.train]
    assert texts[0] == "<s> [INST] Be brief.\n\nWhat is the capital of France? [/INST]"
    assert texts[1].startswith("<s> [INST] Answer with the sum only.\n\nAdd 17")  # the row's own wins


def test_string_templates_split_at_the_generation_prompt(tok):
    bundle = build("preference_openai.jsonl", tok, template="chatml")
    pair = bundle.train[1]
    assert tok.decode(pair["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tok.decode(pair["chosen_ids"], skip_special_tokens=True).startswith("jumps over the lazy dog.")
    assert pair["chosen_ids"][-1] == tok.eos_token_id


def test_held_out_prompts_carry_both_answers(tok):
    bundle = build("preference.jsonl", tok, num_prompts=2)
    first = bundle.prompts[0]
    assert first["prompt_ids"] == bundle.train[0]["prompt_ids"]
    assert (first["reference"], first["rejected"]) == (
        "The capital of France is Paris.",
        "France has no capital.",
    )
    assert first["where"].endswith("preference.jsonl:1") and len(bundle.prompts) == 2


def test_preview_shows_both_sequences_with_answers_marked(tok):
    import io

    from fine_tune.data_preview import preview, render_pair

    bundle = build("preference.jsonl", tok)
    assert render_pair(bundle.train[0], tok) == (
        "[chosen]\n<s> [INST] What is the capital of France? [/INST]« The capital of France is Paris.</s>»\n"
        "[rejected]\n<s> [INST] What is the capital of France? [/INST]« France has no capital.</s>»"
    )
    out = io.StringIO()
    preview(bundle, tok, n=1, stream=out)
    row = bundle.train[0]
    sizes = " / ".join(f"{len(row[f'{c}_ids'])} {c}" for c in ("prompt", "chosen", "rejected"))
    assert "pairs read 6" in out.getvalue() and f"--- train[0]: {sizes} tokens ---" in out.getvalue()
    assert "answer tokens are «marked»" in out.getvalue()
