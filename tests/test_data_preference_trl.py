"""Our preference rows through TRL 1.16's own batching: DPOTrainer's collator and ORPOTrainer's
columns, collator and concatenation see exactly our ids (nothing added, dropped or re-tokenized) and
count exactly the answer tokens."""

from __future__ import annotations

import pytest
from helpers import FIXTURES

from fine_tune.data import build_preference_data
from fine_tune.data.preference import orpo_features

IGNORE = -100


@pytest.fixture(scope="module")
def pairs(tok) -> list[dict]:
    """Rows of two layouts, multi-turn prompts and truncated pairs included, as the trainer gets them."""
    chat = build_preference_data(
        format="preference", path=str(FIXTURES / "preference_chat.jsonl"), tokenizer=tok
    )
    cut = build_preference_data(
        format="preference_openai",
        path=str(FIXTURES / "preference_openai.jsonl"),
        tokenizer=tok,
        max_length=24,
        max_prompt_length=14,
        truncation="truncate",
    )
    assert 0 < cut.report.truncated < len(cut.train)  # cut and whole pairs alike
    return [*chat.train, *cut.train]


def expected(row: dict, answer: str) -> tuple[list[int], list[int]]:
    """The sequence the model must see for one answer, and which of its tokens count (1)."""
    prompt, ids = row["prompt_ids"], row[f"{answer}_ids"]
    return prompt + ids, [0] * len(prompt) + [1] * len(ids)


def test_dpo_collator_keeps_our_ids_and_counts_only_answers(tok, pairs):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    # no max_length, and the longest pair's length as the limit (a run's pairs already fit): the same batch
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in pairs)
    for max_length in (None, longest):
        batch = DataCollatorForPreference(pad_token_id=tok.eos_token_id, max_length=max_length)(pairs)
        n = len(pairs)
        assert batch["input_ids"].shape[0] == 2 * n
        for i, row in enumerate(pairs):
            for half, answer in ((0, "chosen"), (n, "rejected")):
                ids, counted = expected(row, answer)
                k = len(ids)
                assert batch["input_ids"][half + i, :k].tolist() == ids
                assert batch["attention_mask"][half + i].tolist() == [1] * k + [0] * (
                    batch["input_ids"].shape[1] - k
                )
                assert batch["completion_mask"][half + i, :k].tolist() == counted
                assert batch["completion_mask"][half + i, k:].sum() == 0


def test_orpo_columns_batch_to_our_ids(tok, pairs):
    import torch
    from trl.experimental.orpo import ORPOTrainer
    from trl.experimental.utils import DPODataCollatorWithPadding

    pad = tok.eos_token_id
    batch = DPODataCollatorWithPadding(pad_token_id=pad)([orpo_features(r) for r in pairs])
    joined = ORPOTrainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=pad)
    n = len(pairs)
    for i, row in enumerate(pairs):
        for half, answer in ((0, "chosen"), (n, "rejected")):
            ids, counted = expected(row, answer)
            k = len(ids)
            assert joined["concatenated_input_ids"][half + i, :k].tolist() == ids
            assert joined["concatenated_attention_mask"][half + i].sum() == k
            labels = joined["concatenated_labels"][half + i].tolist()
            assert labels == [t if c else IGNORE for t, c in zip(ids, counted, strict=True)] + [IGNORE] * (
                len(labels) - k
            )
    # ORPO's log-probabilities sum over exactly the answer tokens: uniform logits give -log(V) each
    vocab = 11
    logits = torch.zeros((*joined["concatenated_labels"].shape, vocab))
    labels = joined["concatenated_labels"] % vocab * (joined["concatenated_labels"] != IGNORE) + IGNORE * (
        joined["concatenated_labels"] == IGNORE
    )
    sums = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
    answers = [len(r["chosen_ids"]) for r in pairs] + [len(r["rejected_ids"]) for r in pairs]
    assert sums.tolist() == pytest.approx(
        [-a * torch.log(torch.tensor(float(vocab))).item() for a in answers]
    )
