"""`build_data`: files in, tokenized train/eval sets, collator and data report out.

The order matters for users: every file is read and every row validated before anything is
tokenized or cached, so bad input fails in seconds with `file:line`, before a model loads; and a
cache entry is written only after the whole pipeline succeeded, atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fine_tune.data import pipeline
from fine_tune.data.collate import IGNORE_INDEX
from fine_tune.data.formats import Example, to_example
from fine_tune.data.report import DataReport, percentiles
from fine_tune.schema import RunSchema, default

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class DataBundle:
    """What the trainer needs from the data side; see docs/contracts.md."""

    train: Any
    eval: Any
    collator: Any
    report: Any  # DataReport, or PreferenceReport for kind "preference"
    prompts: list[dict[str, Any]] = field(default_factory=list)
    template: str = "mistral_v1"
    test: Any = None  # from dataset.test_path: for a final evaluation, never used in training
    kind: str = "sft"  # sft: input_ids/labels rows; preference: prompt_ids/chosen_ids/rejected_ids rows


# ---- tokenizing -----------------------------------------------------------------------------------
def _tokenize(
    examples: list[Example],
    opts: dict[str, Any],
    template: str,
    tokenizer,
    encoder,
    max_length: int,
    skips: pipeline.Skips,
    report: DataReport,
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Returns (input_ids, labels, raw lengths); applies masking and the truncation policy."""
    from fine_tune.data.templates import encode_examples

    encoded = encode_examples(examples, template, tokenizer, encoder)
    all_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    lengths: list[int] = []
    train_all = bool(opts["train_on_inputs"]) or template == "none"
    for ex, enc in zip(examples, encoded, strict=True):
        ids = enc.input_ids
        labels = (
            list(ids)
            if train_all
            else [t if m else IGNORE_INDEX for t, m in zip(ids, enc.trained, strict=True)]
        )
        lengths.append(len(ids))
        if template == "none" and len(ids) > max_length:
            # continued pre-training: long documents become several chunks instead of being cut
            for start in range(0, len(ids), max_length):
                all_ids.append(ids[start : start + max_length])
                all_labels.append(labels[start : start + max_length])
            report.chunks_split += 1
            continue
        if len(ids) > max_length:
            if opts["truncation"] != "truncate":
                skips.too_long(
                    opts,
                    ex.where,
                    f"row is {len(ids)} tokens, longer than max_length={max_length}",
                    hint="raise max_length, or set dataset.truncation=truncate (cut the end) or "
                    "dataset.truncation=drop (skip such rows, counted in the report)",
                )
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            report.truncated += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):
            skips.add(
                "no_trained_tokens",
                ex.where,
                "no completion tokens left to train on (after truncation)",
                hint="raise max_length, or set dataset.on_bad_row=skip",
            )
            continue
        all_ids.append(ids)
        all_labels.append(labels)
    return all_ids, all_labels, lengths


def _make_dataset(ids: list[list[int]], labels: list[list[int]], packing: bool, max_length: int):
    import datasets

    from fine_tune.data.collate import pack_rows

    if packing:
        cols, eff = pack_rows(ids, labels, max_length)
        return datasets.Dataset.from_dict(cols), eff
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}), None


def _prompts(examples: list[Example], template: str, tokenizer, encoder, n: int) -> list[dict[str, Any]]:
    items = []
    for ex in examples[:n]:
        if ex.text is not None:
            words = ex.text.split()
            messages = [{"role": "user", "content": " ".join(words[: max(8, len(words) // 4)])}]
            reference = " ".join(words[max(8, len(words) // 4) :])
        else:
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            messages, reference = ex.messages[:last], ex.messages[last]["content"]
        items.append({"messages": messages, "reference": reference, "where": ex.where})
    return pipeline.held_out_prompts(items, template, tokenizer, encoder)


def build_data(
    dataset_cfg: Mapping | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = default(RunSchema, "seed"),
    cache_dir: str | os.PathLike | None = None,
    **options: Any,
) -> DataBundle:
    """Read, validate, split, tokenize (cached), pack: everything the trainer needs from the data side.

    Takes the dataset node either as `dataset_cfg` or as keyword arguments (Hydra's instantiate);
    its keys and their defaults are `fine_tune.schema.DatasetSchema`'s (max_length and packing too).
    """
    start = pipeline.start(dataset_cfg, options, "sft", tokenizer, cache_dir, seed, DataReport)
    opts, fmt, fields, template, encoder, sources = start[:6]
    max_length, packing, report = opts["max_length"], opts["packing"], start.report
    if start.cached is not None:
        splits, meta = start.cached
        test, collator = splits["test"], _collator(packing, tokenizer, opts)
        return DataBundle(splits["train"], splits["eval"], collator, report, meta["prompts"], template, test)
    report.packing = packing

    skips = pipeline.Skips(opts["on_bad_row"])

    def convert(row):
        return to_example(fmt, fields, row.data, row.where, opts["system_prompt"], opts["instruction"])

    report.rows_read, train_ex, eval_ex, test_ex = pipeline.load_items(
        opts, sources, fmt, fields, convert, skips, seed
    )
    (train_ids, train_labels, train_lens), (eval_ids, eval_labels, eval_lens), (test_ids, test_labels, _) = (
        _tokenize(examples, opts, template, tokenizer, encoder, max_length, skips, report)
        for examples in (train_ex, eval_ex, test_ex)
    )
    report.rows_dropped, report.dropped_examples = skips.require(len(train_ids), sources.label, "rows")

    lengths = [len(x) for x in train_ids + eval_ids]
    report.token_lengths = percentiles(train_lens + eval_lens)
    report.train_examples, report.eval_examples = len(train_ids), len(eval_ids)
    report.test_examples = len(test_ids)
    report.total_tokens = sum(lengths)
    report.trained_tokens = sum(
        sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in train_labels + eval_labels
    )
    train, eff = _make_dataset(train_ids, train_labels, packing, max_length)
    ev = _make_dataset(eval_ids, eval_labels, packing, max_length)[0] if eval_ids else None
    test = _make_dataset(test_ids, test_labels, False, max_length)[0] if test_ids else None
    if packing:
        report.packed_rows, report.packing_efficiency = len(train), round(eff or 0.0, 4)
    else:
        report.padding_efficiency = round(sum(lengths) / (len(lengths) * max(lengths)), 4)
    prompts = _prompts(eval_ex or train_ex, template, tokenizer, encoder, int(opts["num_prompts"] or 0))
    start.finish({"train": train, "eval": ev, "test": test}, prompts)
    return DataBundle(train, ev, _collator(packing, tokenizer, opts), report, prompts, template, test)


def _collator(packing: bool, tokenizer, opts: dict[str, Any]):
    from fine_tune.data.collate import PackedCollator, PaddingCollator

    if packing:
        return PackedCollator()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PaddingCollator(pad if pad is not None else 0, opts["pad_to_multiple_of"])
