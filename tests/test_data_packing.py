"""Packing must not change what is learned: a packed batch has the same loss as the padded one."""

from __future__ import annotations

import pytest
from helpers import FIXTURES, tiny_mistral_config

from fine_tune.data import build_data
from fine_tune.data.collate import PackedCollator, PaddingCollator, pack, pack_rows

IGNORE = -100


@pytest.fixture(scope="module")
def rows(tok):
    bundle = build_data({"format": "sample", "max_samples": 12}, tokenizer=tok, max_length=128)
    return [bundle.train[i] for i in range(8)]


def tiny_mistral(impl: str):
    import torch
    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(tiny_mistral_config(vocab_size=32000, attn_implementation=impl))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(rows, impl):
    import torch

    model = tiny_mistral(impl).train()  # train mode: the trainer's mode (dropout is 0 in MistralConfig)
    padded = PaddingCollator(pad_token_id=0)(rows)
    packed = PackedCollator()(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    # same targets in both: every trained token of every example, nothing across boundaries
    assert int((packed["labels"] != IGNORE).sum()) == int((padded["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        unpacked_loss = model(**padded).loss
        packed_loss = model(**packed).loss
        # the control: the same row as one sequence (examples see each other) must differ, or this
        # test could not detect a boundary leak
        leaky = dict(packed, use_cache=True)
        leaky_loss = model(**leaky).loss
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-5)
    assert abs(leaky_loss.item() - unpacked_loss.item()) > 1e-3


def test_packed_gradients_equal_unpacked_gradients(rows):
    import torch

    model = tiny_mistral("sdpa").train()
    grads = []
    for batch in (PaddingCollator(0)(rows), PackedCollator()(rows)):
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_pack_fills_bins_without_overflow_and_keeps_every_example():
    lengths = [50, 30, 90, 10, 64, 64, 1, 127, 33]
    bins = pack(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert bins == pack(lengths, 128)  # deterministic
    # first-fit decreasing needs ceil(sum/128) = 4 bins here
    assert len(bins) == 4


def test_pack_rows_restarts_positions_and_masks_first_label():
    ids = [[1, 5, 6, 7], [1, 8, 9], [1, 4]]
    labels = [[IGNORE, IGNORE, 6, 7], [1, 8, 9], [1, 4]]
    cols, eff = pack_rows(ids, labels, max_length=8)
    assert cols["input_ids"] == [[1, 5, 6, 7, 1, 8, 9], [1, 4]]
    assert cols["position_ids"] == [[0, 1, 2, 3, 0, 1, 2], [0, 1]]
    assert cols["labels"] == [[IGNORE, IGNORE, 6, 7, IGNORE, 8, 9], [IGNORE, 4]]
    assert eff == pytest.approx(9 / 16)


def test_build_data_packing_report_and_rows(tok):
    bundle = build_data(
        format="alpaca", path=str(FIXTURES / "alpaca.jsonl"), tokenizer=tok, max_length=64, packing=True
    )
    unpacked = build_data(format="alpaca", path=str(FIXTURES / "alpaca.jsonl"), tokenizer=tok, max_length=64)
    total = sum(len(r["input_ids"]) for r in unpacked.train)
    assert set(bundle.train.column_names) == {"input_ids", "labels", "position_ids"}
    assert sum(len(r["input_ids"]) for r in bundle.train) == total
    assert all(len(r["input_ids"]) <= 64 for r in bundle.train)
    assert bundle.report.packed_rows == len(bundle.train) < len(unpacked.train)
    assert bundle.report.packing_efficiency == pytest.approx(total / (64 * len(bundle.train)), abs=1e-4)
    batch = bundle.collator([bundle.train[i] for i in range(len(bundle.train))])
    assert batch["use_cache"] is False and batch["input_ids"].shape == (1, total)
    assert int((batch["position_ids"] == 0).sum()) == len(unpacked.train)
