"""The Mistral prompt format, token for token against Mistral's reference tokenizer (mistral-common)."""

from __future__ import annotations

import json

import pytest
from helpers import mistral_tokenizer, reference, saved_copy

from fine_tune.data import build_data, render_prompt

IGNORE = -100

CONVERSATIONS = [
    [("user", "Hello world"), ("assistant", "Hi there")],
    [
        ("system", "Be nice."),
        ("user", "Hello world"),
        ("assistant", "Hi there"),
        ("user", "How?"),
        ("assistant", "Like this."),
    ],
    # runs of spaces, trailing spaces, newlines, unicode, text that looks like markup
    [("user", "James writes a letter.  How many pages?  "), ("assistant", "He writes  2 pages. ")],
    [
        ("system", "You are a pirate.\nSpeak like one."),
        ("user", "Où est le trésor ? 宝物"),
        ("assistant", "Arr, matey!\n\n- first\n- second"),
    ],
    [
        ("user", "Explain [INST] tokens"),
        ("assistant", "They mark </s> user turns [/INST]."),
        ("user", "ok"),
        ("user", "and two users in a row"),
        ("assistant", "merged with a blank line"),
    ],
    [
        ("user", "1+1=?"),
        ("assistant", "2"),
        ("user", "2+2=?"),
        ("assistant", "4"),
        ("user", "3+3=?"),
        ("assistant", "6"),
    ],
]


def write_chat(path, conversations) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for conv in conversations:
            row = {"messages": [{"role": r, "content": c} for r, c in conv]}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@pytest.mark.parametrize("version", ["v1", "v3", "v7"])
def test_training_ids_match_mistral_common(tmp_path, version):
    tok = mistral_tokenizer(version)
    write_chat(tmp_path / "chat.jsonl", CONVERSATIONS)
    bundle = build_data(
        format="chat", path=str(tmp_path / "chat.jsonl"), template="mistral", tokenizer=tok, max_length=512
    )
    assert bundle.report.template == f"mistral_{version}"
    assert bundle.report.encoder == "sentencepiece"
    for i, conv in enumerate(CONVERSATIONS):
        assert bundle.train[i]["input_ids"] == reference(version, conv), conv


@pytest.mark.parametrize("version", ["v1", "v3", "v7"])
def test_prompt_ids_match_mistral_common_serving(version):
    tok = mistral_tokenizer(version)
    for conv in CONVERSATIONS:
        history = [(r, c) for r, c in conv]
        messages = [{"role": r, "content": c} for r, c in history] + [{"role": "user", "content": "Next?"}]
        assert render_prompt(messages, tok, "mistral") == reference(version, history, final_user="Next?")


def test_reference_example_from_the_brief():
    tok = mistral_tokenizer()
    ids = render_prompt(
        [
            {"role": "user", "content": "Hello world"},
            {"role": "assistant", "content": "Hi there"},
            {"role": "user", "content": "How?"},
        ],
        tok,
        "mistral",
    )
    assert ids[:4] == [1, 733, 16289, 28793]
    assert ids == reference("v1", [("user", "Hello world"), ("assistant", "Hi there")], final_user="How?")
    assert tok.convert_ids_to_tokens(ids)[-4:] == ["▁[", "/", "INST", "]"]


@pytest.mark.parametrize("version", ["v1", "v3", "v7"])
def test_labels_are_exactly_the_assistant_turns(tmp_path, version):
    """Trained = from just after each [/INST] through the EOS closing that answer; nothing else."""
    tok = mistral_tokenizer(version)
    write_chat(tmp_path / "chat.jsonl", CONVERSATIONS)
    bundle = build_data(
        format="chat", path=str(tmp_path / "chat.jsonl"), tokenizer=tok, template="mistral", max_length=512
    )
    end_inst = [733, 28748, 16289, 28793] if version == "v1" else [tok.convert_tokens_to_ids("[/INST]")]
    for conv, row in zip(CONVERSATIONS, bundle.train, strict=True):
        ids, labels = row["input_ids"], row["labels"]
        expected = [IGNORE] * len(ids)
        answers = 0
        for i in range(len(ids)):
            if ids[i : i + len(end_inst)] == end_inst:
                a = i + len(end_inst)
                b = ids.index(tok.eos_token_id, a) + 1
                expected[a:b] = ids[a:b]
                answers += 1
        assert answers == sum(role == "assistant" for role, _ in conv)
        assert labels == expected


def test_saved_tokenizer_still_encodes_like_mistral_common(tmp_path):
    """save_pretrained drops tokenizer.model; the encoder finds the matching bundled model again."""
    tok = saved_copy(mistral_tokenizer(), tmp_path / "tok")
    assert getattr(tok, "vocab_file", None) is None
    conv = CONVERSATIONS[2]
    assert render_prompt(
        [{"role": r, "content": c} for r, c in conv] + [{"role": "user", "content": "x"}], tok, "mistral"
    ) == reference("v1", conv, final_user="x")


def test_hf_encoder_differs_on_runs_of_spaces(tmp_path):
    """Why the sentencepiece encoder is the default: the HF fast tokenizer splits '.  H' differently."""
    tok = mistral_tokenizer()
    write_chat(tmp_path / "chat.jsonl", [CONVERSATIONS[2]])
    hf = build_data(
        format="chat", path=str(tmp_path / "chat.jsonl"), tokenizer=tok, encoder="hf", max_length=128
    )
    assert hf.report.encoder == "hf"
    assert hf.train[0]["input_ids"] != reference("v1", CONVERSATIONS[2])
