"""Each data shape on a small fixture: what is read, what the model sees, and which tokens are trained."""

from __future__ import annotations

import json

from helpers import FIXTURES

from fine_tune.data import build_data, render_prompt

IGNORE = -100


def trained_text(tok, row) -> str:
    return tok.decode([t for t in row["labels"] if t != IGNORE])


def prompt_len(row) -> int:
    return next(i for i, t in enumerate(row["labels"]) if t != IGNORE)


def check_completion_only(tok, row, answer_ids: list[int]) -> None:
    """Labels are -100 on exactly the prompt, and equal to the ids on the answer + final EOS."""
    ids, labels = row["input_ids"], row["labels"]
    n = len(answer_ids) + 1
    assert labels[: len(ids) - n] == [IGNORE] * (len(ids) - n)
    assert labels[len(ids) - n :] == ids[len(ids) - n :] == [*answer_ids, tok.eos_token_id]


def sp_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sample_builds_with_shipped_validation_file(tok):
    bundle = build_data({"format": "sample"}, tokenizer=tok, max_length=256)
    assert len(bundle.train) >= 300 and bundle.eval is not None and len(bundle.eval) >= 20
    assert bundle.report.rows_read == len(bundle.train) + len(bundle.eval)
    row = bundle.train[0]
    assert set(row) == {"input_ids", "labels"}
    assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"][-1] == tok.eos_token_id
    # The prompt part is exactly what generation will be given.
    src = bundle.prompts[0]
    assert src["prompt_ids"] == render_prompt(src["messages"], tok, "mistral")
    assert "[/INST]" in src["prompt_text"] and src["reference"] not in src["prompt_text"]


def test_alpaca_masks_prompt_and_trains_answer_plus_eos(tok):
    bundle = build_data(format="alpaca", path=str(FIXTURES / "alpaca.jsonl"), tokenizer=tok, max_length=128)
    assert bundle.eval is None and len(bundle.train) == 6
    first = bundle.train[0]
    expected_prompt = [tok.bos_token_id, *sp_ids(tok, "[INST] Add the numbers.\n\n12 and 30 [/INST]")]
    assert first["input_ids"][: len(expected_prompt)] == expected_prompt
    check_completion_only(tok, first, sp_ids(tok, "12 + 30 = 42."))
    assert prompt_len(first) == len(expected_prompt)
    # a row without input has no blank-line join
    second = bundle.train[1]
    assert second["input_ids"][:-1][: prompt_len(second)] == [
        tok.bos_token_id,
        *sp_ids(tok, "[INST] What is the capital of Peru? [/INST]"),
    ]


def test_train_on_inputs_trains_every_token(tok):
    bundle = build_data(
        format="alpaca",
        path=str(FIXTURES / "alpaca.jsonl"),
        train_on_inputs=True,
        tokenizer=tok,
        max_length=128,
    )
    for row in bundle.train:
        assert row["labels"] == row["input_ids"]


def test_dolly_joins_context(tok):
    bundle = build_data(format="dolly", path=str(FIXTURES / "dolly.jsonl"), tokenizer=tok, max_length=128)
    row = bundle.train[0]
    context = "Hamlet is a tragedy written by William Shakespeare around 1600."
    prompt = f"[INST] Who wrote the play?\n\n{context} [/INST]"
    assert row["input_ids"][: prompt_len(row)] == [tok.bos_token_id, *sp_ids(tok, prompt)]
    check_completion_only(tok, row, sp_ids(tok, "William Shakespeare wrote Hamlet."))


def test_qa_csv_uses_plain_question_answer_format(tok):
    bundle = build_data(
        format="qa",
        path=str(FIXTURES / "qa.csv"),
        fields={"question": "question", "answer": "answer"},
        tokenizer=tok,
        max_length=128,
    )
    assert bundle.report.template == "qa"
    row = bundle.train[1]
    text = tok.decode(row["input_ids"], skip_special_tokens=False)
    assert (
        text == "<s> ### Question: Which gas do plants take in, for photosynthesis?\n### Answer: "
        "Plants take in carbon dioxide.</s>"
    )
    # ids are those of the whole string tokenized at once (no seams between prompt and answer)
    full = (
        "### Question: Which gas do plants take in, for photosynthesis?\n"
        "### Answer: Plants take in carbon dioxide."
    )
    assert row["input_ids"] == [tok.bos_token_id, *sp_ids(tok, full), tok.eos_token_id]
    assert trained_text(tok, row) == "Plants take in carbon dioxide.</s>"
    prompt = bundle.prompts[0]["prompt_ids"]
    assert bundle.train[0]["input_ids"][: len(prompt)] == prompt
    assert prompt_len(bundle.train[0]) == len(prompt)


def test_law_title_trains_title_only(tok):
    bundle = build_data(
        format="law_title", path=str(FIXTURES / "law_title.jsonl"), tokenizer=tok, max_length=256
    )
    row = bundle.train[1]
    assert trained_text(tok, row) == "Who owns unclaimed lost property handed to the police?</s>"
    prompt = tok.decode(row["input_ids"][: prompt_len(row)])
    assert prompt.startswith(
        "<s> [INST] Write a short, specific title for this legal question.\n\nI found a wallet"
    )


def test_text_trains_everything_and_chunks_long_documents(tok):
    bundle = build_data(format="text", path=str(FIXTURES / "text.jsonl"), tokenizer=tok, max_length=16)
    lengths = [len(r["input_ids"]) for r in bundle.train]
    assert all(n <= 16 for n in lengths)
    first_doc = [
        tok.bos_token_id,
        *sp_ids(tok, json.loads((FIXTURES / "text.jsonl").read_text().splitlines()[0])["text"]),
        tok.eos_token_id,
    ]
    n_chunks = -(-len(first_doc) // 16)
    assert [t for r in bundle.train.select(range(n_chunks)) for t in r["input_ids"]] == first_doc
    for row in bundle.train:
        assert row["labels"] == row["input_ids"]
    assert bundle.report.chunks_split == 2 and bundle.report.truncated == 0


def test_chat_trains_every_assistant_turn(tok):
    bundle = build_data(format="chat", path=str(FIXTURES / "chat.jsonl"), tokenizer=tok, max_length=128)
    row = bundle.train[1]
    ids, labels = row["input_ids"], row["labels"]
    turns = [sp_ids(tok, "4.") + [tok.eos_token_id], sp_ids(tok, "12.") + [tok.eos_token_id]]
    trained_positions = [i for i, t in enumerate(labels) if t != IGNORE]
    # exactly the two assistant turns, each followed by EOS
    first = sp_ids(tok, "[INST] Answer briefly.\n\nWhat is 2 + 2? [/INST]")
    second = sp_ids(tok, "[INST] And times 3? [/INST]")
    expected = [tok.bos_token_id, *first, *turns[0], *second, *turns[1]]
    assert ids == expected
    a0 = 1 + len(first)
    a1 = a0 + len(turns[0]) + len(second)
    assert trained_positions == [*range(a0, a0 + len(turns[0])), *range(a1, a1 + len(turns[1]))]
    # ShareGPT from/value rows are accepted
    assert trained_text(tok, bundle.train[2]) == "An apple.</s>"


def test_chatml_template(tok):
    bundle = build_data(
        format="chat", path=str(FIXTURES / "chat.jsonl"), template="chatml", tokenizer=tok, max_length=128
    )
    row = bundle.train[0]
    assert tok.decode(row["input_ids"]) == (
        "<s> <|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n</s>"
    )
    assert trained_text(tok, row).replace(" ", "") == "Hithere<|im_end|></s>"
    prompt = render_prompt([{"role": "user", "content": "Hello world"}], tok, "chatml")
    assert row["input_ids"][: len(prompt)] == prompt and prompt_len(row) == len(prompt)


SIMPLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<user>{{ m['content'] }}</user>"
    "{% else %}<bot>{{ m['content'] }}</bot>{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<bot>{% endif %}"
)


def test_models_own_chat_template_is_used_when_present(tok, tmp_path):
    from helpers import saved_copy

    t = saved_copy(tok, tmp_path / "tok")
    t.add_tokens(["<|extra|>"])  # no longer Mistral's vocabulary: auto picks the model's template
    t.chat_template = SIMPLE_TEMPLATE
    bundle = build_data(format="chat", path=str(FIXTURES / "chat.jsonl"), tokenizer=t, max_length=128)
    assert bundle.report.template == "chat_template"
    row = bundle.train[0]
    rendered = t.apply_chat_template(
        [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi there"}],
        tokenize=False,
    )
    assert row["input_ids"] == t(rendered, add_special_tokens=False)["input_ids"]
    assert trained_text(t, row).replace(" ", "") == "Hithere</bot></s>"
    prompt = render_prompt([{"role": "user", "content": "Hello world"}], t, "chat_template")
    assert t.decode(prompt) == "<s><user>Hello world</user><bot>"


def test_mistral_vocabulary_prefers_the_reference_format_over_a_jinja_template(tok, tmp_path):
    from helpers import saved_copy

    t = saved_copy(tok, tmp_path / "tok")
    t.chat_template = SIMPLE_TEMPLATE
    auto = build_data(format="chat", path=str(FIXTURES / "chat.jsonl"), tokenizer=t, max_length=128)
    assert auto.report.template == "mistral_v1"
    explicit = build_data(
        format="chat",
        path=str(FIXTURES / "chat.jsonl"),
        template="chat_template",
        tokenizer=t,
        max_length=128,
    )
    assert explicit.report.template == "chat_template"
    assert tok.decode(explicit.train[0]["input_ids"]).startswith("<s><user>Hello world</user>")


def test_chat_template_that_moves_the_system_prompt_still_masks_every_turn(tok, tmp_path):
    """Like HF's Mistral v3 template: the system prompt goes into the last user turn, so prefixes of a
    conversation render differently from the whole; the assistant turns are found by content."""
    from helpers import saved_copy

    t = saved_copy(tok, tmp_path / "tok")
    t.chat_template = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
        "{% set ns = namespace(last=-1) %}{% for m in rest %}{% if m['role'] == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in rest %}{% if m['role'] == 'user' %}[INST] {% if sys and loop.index0 == ns.last %}"
        "{{ sys }}\n\n{% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}"
    )
    bundle = build_data(
        format="chat",
        path=str(FIXTURES / "chat.jsonl"),
        tokenizer=t,
        max_length=128,
        template="chat_template",
    )
    row = bundle.train[1]  # system + two user/assistant turns
    ids, labels = row["input_ids"], row["labels"]
    assert (
        tok.decode(ids) == "<s>[INST] What is 2 + 2? [/INST] 4.</s>[INST] Answer briefly.\n\nAnd times 3? "
        "[/INST] 12.</s>"
    )
    runs, current = [], []
    for i, label in enumerate(labels):
        if label != IGNORE:
            current.append(ids[i])
        elif current:
            runs.append(current)
            current = []
    runs.append(current)
    assert [t.decode(r).strip() for r in runs] == ["4.</s>", "12.</s>"]
