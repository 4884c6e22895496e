"""`build_preference_data`: preference pairs in, tokenized pairs for TRL's DPO / ORPO trainers out.

Each row of `bundle.train` / `bundle.eval` / `bundle.test` (a `datasets.Dataset`) holds three
lists of token ids, the layout TRL 1.16's `DPOTrainer` produces from text and its
`DataCollatorForPreference` consumes:

    prompt_ids    the conversation up to where the assistant answers (BOS first; for Mistral
                  templates `<s>[INST] ... [/INST]`), exactly what `render_prompt` gives at inference
    chosen_ids    the chosen answer as the template renders it after that prompt, through the EOS
                  the template closes an answer with
    rejected_ids  the same for the rejected answer

`prompt_ids + chosen_ids` is, token for token, the whole conversation as SFT data renders it (and,
for Mistral templates, as mistral-common encodes it). Every answer token counts in the loss and no
prompt token does; TRL's collator turns this into `input_ids` / `attention_mask` /
`completion_mask` without adding or removing a token. See docs/contracts.md for how the trainer
must pass these rows to TRL (its own dataset preparation would re-tokenize text).

Length policy (`max_length` = the limit for prompt + each answer, as the model sees them):
`truncation=error` stops at a pair that does not fit, `drop` skips it (counted), and `truncate`
cuts the prompt first, only as far as the longer answer needs but never below `max_prompt_length`
tokens (default half of max_length), keeping its BOS and its end (the question and the marker the
answer follows); answers still too long then lose their ends.
Pairs whose chosen and rejected ids are identical carry no preference: dropped and counted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fine_tune.data import pipeline
from fine_tune.data.build import DataBundle
from fine_tune.data.collate import IGNORE_INDEX
from fine_tune.data.formats import Example
from fine_tune.data.pairs import Pair, to_pair
from fine_tune.data.report import IDENTICAL, PreferenceReport, percentiles
from fine_tune.errors import UserError
from fine_tune.schema import RunSchema, default

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fine_tune.data.templates import SegmentEncoder

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
KIND = "preference"


@dataclass
class EncodedPair:
    where: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def longest(self) -> int:
        """Tokens of the longer of the two sequences the model sees (prompt + answer)."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def encode_pairs(
    pairs: list[Pair], template: str, tokenizer: PreTrainedTokenizerBase, encoder: SegmentEncoder
) -> list[EncodedPair]:
    """Render each pair with the SFT machinery: the prompt as a generation prompt, each answer as
    the tokens that follow it in the whole conversation (one batch per backend)."""
    from fine_tune.data.templates import encode_examples, encode_prompts

    prompts = encode_prompts([p.prompt for p in pairs], template, tokenizer, encoder)
    chosen = encode_examples(
        [Example(p.where, [*p.prompt, *p.chosen]) for p in pairs], template, tokenizer, encoder
    )
    rejected = encode_examples(
        [Example(p.where, [*p.prompt, *p.rejected]) for p in pairs], template, tokenizer, encoder
    )
    out = []
    for pair, prompt, c, r in zip(pairs, prompts, chosen, rejected, strict=True):
        n = len(prompt)
        if c.input_ids[:n] != prompt or r.input_ids[:n] != prompt:
            raise UserError(
                f"template {template} renders this prompt differently alone than followed by an answer, "
                "so the answer cannot be split off token for token",
                where=pair.where,
                hint="use dataset.template=mistral (or chatml)",
            )
        out.append(EncodedPair(pair.where, prompt, c.input_ids[n:], r.input_ids[n:]))
    return out


def truncate_pair(pair: EncodedPair, max_length: int, max_prompt_length: int, bos: int | None) -> EncodedPair:
    """Prompt first, as far as the longer answer needs but not below `max_prompt_length` (keeping
    BOS and the prompt's last tokens), then the answers' ends."""
    prompt = pair.prompt
    keep = max(max_prompt_length, max_length - max(len(pair.chosen), len(pair.rejected)))
    if len(prompt) > keep:
        head = prompt[:1] if bos is not None and prompt[:1] == [bos] else []
        prompt = head + prompt[len(prompt) - (keep - len(head)) :]
    room = max_length - len(prompt)
    return EncodedPair(pair.where, prompt, pair.chosen[:room], pair.rejected[:room])


def _fit(
    pairs: list[EncodedPair],
    opts: dict[str, Any],
    max_length: int,
    max_prompt_length: int,
    bos: int | None,
    skips: pipeline.Skips,
    report: PreferenceReport,
) -> list[EncodedPair]:
    """Applies the length policy and drops pairs without a preference (identical answers)."""
    kept = []
    for pair in pairs:
        if pair.chosen == pair.rejected:
            skips.drop(IDENTICAL, pair.where, "chosen and rejected are the same tokens")
            continue
        if pair.longest() > max_length:
            if opts["truncation"] != "truncate":
                skips.too_long(
                    opts,
                    pair.where,
                    f"pair is {pair.longest()} tokens (prompt {len(pair.prompt)} + longer answer), "
                    f"longer than max_length={max_length}",
                    hint="raise max_length, or set dataset.truncation=truncate (prompt first, then the "
                    "answers' ends) or dataset.truncation=drop (skip such pairs, counted in the report)",
                )
                continue
            pair = truncate_pair(pair, max_length, max_prompt_length, bos)
            report.truncated += 1
            if pair.chosen == pair.rejected:
                skips.drop(IDENTICAL, pair.where, "chosen and rejected are the same tokens after truncation")
                continue
        kept.append(pair)
    return kept


def _dataset(pairs: list[EncodedPair]):
    import datasets

    if not pairs:
        return None
    return datasets.Dataset.from_dict(
        {
            "prompt_ids": [p.prompt for p in pairs],
            "chosen_ids": [p.chosen for p in pairs],
            "rejected_ids": [p.rejected for p in pairs],
        }
    )


def _count(
    report: PreferenceReport, encoded: dict[str, list[EncodedPair]], fitted: dict[str, list[EncodedPair]]
) -> None:
    """Lengths of the pairs as read (train + eval, before truncation); tokens of those kept."""
    seen = encoded["train"] + encoded["eval"]
    report.prompt_lengths = percentiles([len(p.prompt) for p in seen])
    report.chosen_lengths = percentiles([len(p.chosen) for p in seen])
    report.rejected_lengths = percentiles([len(p.rejected) for p in seen])
    report.train_examples, report.eval_examples = len(fitted["train"]), len(fitted["eval"])
    report.test_examples = len(fitted["test"])
    used = fitted["train"] + fitted["eval"]
    report.trained_tokens = sum(len(p.chosen) + len(p.rejected) for p in used)
    report.total_tokens = report.trained_tokens + sum(2 * len(p.prompt) for p in used)


def _prompts(pairs: list[Pair], template: str, tokenizer, encoder, n: int) -> list[dict[str, Any]]:
    """Held-out prompts for samples; `reference` is the chosen answer, `rejected` the other."""

    def text(messages: list[dict[str, str]]) -> str:
        return "\n\n".join(m["content"] for m in messages)

    items = [
        {"messages": p.prompt, "reference": text(p.chosen), "rejected": text(p.rejected), "where": p.where}
        for p in pairs[:n]
    ]
    return pipeline.held_out_prompts(items, template, tokenizer, encoder)


def prompt_budget(opts: Mapping[str, Any]) -> int:
    """The prompt tokens `truncation=truncate` always keeps: `max_prompt_length`, or half of max_length."""
    return opts["max_prompt_length"] or opts["max_length"] // 2


def build_preference_data(
    dataset_cfg: Mapping | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = default(RunSchema, "seed"),
    cache_dir: str | os.PathLike | None = None,
    **options: Any,
) -> DataBundle:
    """Read, validate, split, render, fit to max_length (cached): preference pairs for TRL.

    Same call as `build_data` (the dataset node or keyword options; Hydra's instantiate). Returns a
    `DataBundle` with kind "preference", rows of `COLUMNS`, `collator=None` (TRL's own collator
    pads these rows) and a `PreferenceReport`.
    """
    start = pipeline.start(dataset_cfg, options, KIND, tokenizer, cache_dir, seed, PreferenceReport)
    opts, fmt, fields, template, encoder, sources = start[:6]
    max_length, max_prompt_length, report = opts["max_length"], prompt_budget(opts), start.report
    if start.cached is not None:
        splits, meta = start.cached
        return DataBundle(
            splits["train"], splits["eval"], None, report, meta["prompts"], template, splits["test"], KIND
        )
    report.max_prompt_length = max_prompt_length

    skips = pipeline.Skips(opts["on_bad_row"])

    def convert(row):
        return to_pair(fmt, fields, row.data, row.where, opts["system_prompt"])

    report.rows_read, train, held, test = pipeline.load_items(
        opts, sources, fmt, fields, convert, skips, seed
    )
    encoded = {
        name: encode_pairs(pairs, template, tokenizer, encoder)
        for name, pairs in (("train", train), ("eval", held), ("test", test))
    }
    bos = tokenizer.bos_token_id
    fitted = {
        name: _fit(pairs, opts, max_length, max_prompt_length, bos, skips, report)
        for name, pairs in encoded.items()
    }
    report.rows_dropped, report.dropped_examples = skips.require(len(fitted["train"]), sources.label, "pairs")
    _count(report, encoded, fitted)
    splits = {name: _dataset(pairs) for name, pairs in fitted.items()}
    prompts = _prompts(held or train, template, tokenizer, encoder, int(opts["num_prompts"] or 0))
    start.finish(splits, prompts)
    return DataBundle(splits["train"], splits["eval"], None, report, prompts, template, splits["test"], KIND)


def orpo_features(row: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """One of our rows in the columns TRL 1.16's experimental `ORPOTrainer` reads (what its
    `tokenize_row` returns for a decoder-only model): a trainer that overrides `tokenize_row` with
    this trains ORPO on exactly our ids (labels -100 on the prompt)."""
    prompt = list(row["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for name in ("chosen", "rejected"):
        answer = list(row[f"{name}_ids"])
        out[f"{name}_input_ids"] = prompt + answer
        out[f"{name}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
    return out
