"""`build_data`: files in, tokenized train/eval sets, collator and data report out.

The order matters for users: every file is read and every row validated before anything is
tokenized or cached, so bad input fails in seconds with `file:line`, before a model loads; and a
cache entry is written only after the whole pipeline succeeded, atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fine_tune.data.formats import BadRow, Example, check_columns, get_format, resolve_fields, to_example
from fine_tune.data.readers import Row, read_file, read_hub, resolve_paths
from fine_tune.data.report import DataReport, percentiles
from fine_tune.errors import UserError
from fine_tune.schema import RunSchema, check_group, default

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_VERSION = "1"
RESOURCES = Path(__file__).resolve().parents[1] / "resources" / "data"
SAMPLE_TRAIN = RESOURCES / "sample_instructions.jsonl"
SAMPLE_VALIDATION = RESOURCES / "sample_instructions.validation.jsonl"
IGNORE_INDEX = -100


@dataclass
class DataBundle:
    """What the trainer needs from the data side; see docs/contracts.md."""

    train: Any
    eval: Any
    collator: Any
    report: DataReport
    prompts: list[dict[str, Any]] = field(default_factory=list)
    template: str = "mistral_v1"
    test: Any = None  # from dataset.test_path: for a final evaluation, never used in training


def _options(dataset_cfg: Mapping | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The dataset node and keyword options, checked and completed by the dataset schema."""
    raw: dict[str, Any] = {}
    if dataset_cfg is not None:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(dataset_cfg, DictConfig):
            dataset_cfg = OmegaConf.to_container(dataset_cfg, resolve=True)
        raw.update(dict(dataset_cfg))
    raw.update(kwargs)
    raw.pop("_convert_", None)
    opts = check_group("dataset", raw)
    opts.pop("_target_")
    return opts


# ----------------------------------------------------------------------------------------------------
# Reading and validating


class _Skips:
    """Counts skipped rows by reason (on_bad_row=skip) or turns the first into a UserError."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, reason: str, where: str, detail: str, hint: str | None = None) -> None:
        if self.mode == "error":
            raise UserError(
                detail,
                where=where,
                hint=hint or "fix the row, or set dataset.on_bad_row=skip to skip bad rows",
            )
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {detail}")


def _read_sources(
    opts: dict[str, Any], paths: list[Path] | None, hub_split: str | None, skips: _Skips
) -> list[Row]:
    if paths is not None:
        bad: list[tuple[str, str, str]] | None = [] if opts["on_bad_row"] == "skip" else None
        rows: list[Row] = []
        for p in paths:
            file_rows = read_file(p, opts["file_type"], bad)
            rows.extend(file_rows)
        for reason, where, detail in bad or []:
            skips.add(reason, where, detail)
        return rows
    return read_hub(opts["hub_name"], hub_split or "train", opts["subset"], opts["revision"])


def _to_examples(rows: list[Row], opts: dict[str, Any], skips: _Skips) -> list[Example]:
    fmt = get_format(opts["format"])
    fields = resolve_fields(fmt, opts["fields"])
    by_file: dict[str, set[str]] = {}
    for row in rows:
        by_file.setdefault(row.source or row.where, set()).update(row.data)
    for name, columns in by_file.items():
        check_columns(fmt, fields, columns, name)
    out = []
    for row in rows:
        try:
            out.append(
                to_example(fmt, fields, row.data, row.where, opts["system_prompt"], opts["instruction"])
            )
        except BadRow as bad:
            found = sorted(row.data)
            skips.add(bad.reason, row.where, f"{bad.detail} (row has fields {found})")
    return out


# ----------------------------------------------------------------------------------------------------
# Cache


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_key(opts: dict[str, Any], files: list[Path], tokenizer_fp: str, seed: int) -> str:
    """Everything the cached rows depend on (max_length and packing are among the options)."""
    relevant = {k: v for k, v in opts.items() if k not in ("name", "num_prompts", "pad_to_multiple_of")}
    payload = {
        "v": CACHE_VERSION,
        "opts": relevant,
        "files": [[str(p.resolve()), _file_digest(p)] for p in files],
        "tok": tokenizer_fp,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _load_cache(entry: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import datasets

    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    splits = {
        name: datasets.load_from_disk(str(entry / name)) if (entry / name).exists() else None
        for name in ("train", "eval", "test")
    }
    return splits, meta


def _save_cache(entry: Path, splits: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write into a private temp dir, then rename: readers see a whole entry or none."""
    from datasets.utils import logging as ds_logging

    from fine_tune.utils.io import atomic_write_json

    entry.parent.mkdir(parents=True, exist_ok=True)
    for stale in entry.parent.glob(".data-*.tmp"):  # left by jobs killed mid-write
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 6 * 3600:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = entry.parent / f".{entry.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # one bar per split per job is noise in a sweep's logs
    try:
        for name, ds in splits.items():
            if ds is not None:
                ds.save_to_disk(str(tmp / name))
        atomic_write_json(tmp / "meta.json", meta)
        # another job of the sweep may have won the race; its entry is as good as ours
        with contextlib.suppress(OSError):
            os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            ds_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------------
# Tokenizing


def _tokenize(
    examples: list[Example],
    opts: dict[str, Any],
    template: str,
    tokenizer,
    encoder,
    max_length: int,
    skips: _Skips,
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
            policy = opts["truncation"]
            if policy == "truncate":
                ids, labels = ids[:max_length], labels[:max_length]
                report.truncated += 1
            elif policy == "drop" or opts["on_bad_row"] == "skip":
                skips.counts["too_long"] += 1
                if len(skips.examples) < 5:
                    skips.examples.append(f"{ex.where}: {len(ids)} tokens > max_length {max_length}")
                continue
            else:
                raise UserError(
                    f"row is {len(ids)} tokens, longer than max_length={max_length}",
                    where=ex.where,
                    hint="raise max_length, or set dataset.truncation=truncate (cut the end) or "
                    "dataset.truncation=drop (skip such rows, counted in the report)",
                )
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
    from fine_tune.data.templates import render_prompt

    out = []
    for ex in examples[:n]:
        if ex.text is not None:
            words = ex.text.split()
            messages = [{"role": "user", "content": " ".join(words[: max(8, len(words) // 4)])}]
            reference = " ".join(words[max(8, len(words) // 4) :])
        else:
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            messages, reference = ex.messages[:last], ex.messages[last]["content"]
        ids = render_prompt(messages, tokenizer, template, encoder=encoder)
        out.append(
            {
                "prompt_ids": ids,
                "prompt_text": tokenizer.decode(ids),
                "messages": messages,
                "reference": reference,
                "where": ex.where,
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------


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
    from fine_tune.data.templates import SegmentEncoder, resolve_template, template_fingerprint

    started = time.perf_counter()
    opts = _options(dataset_cfg, options)
    max_length, packing = opts["max_length"], opts["packing"]
    fmt = get_format(opts["format"])
    template = (
        "none" if fmt.name == "text" else resolve_template(opts["template"], tokenizer, fmt.default_template)
    )
    encoder = SegmentEncoder(tokenizer, prefer_sentencepiece=opts["encoder"] != "hf")
    if opts["encoder"] == "sentencepiece" and encoder.sp is None:
        raise UserError(
            "no sentencepiece model matches this tokenizer's vocabulary",
            where="dataset.encoder",
            hint="use dataset.encoder=auto",
        )

    # Sources: explicit path > hub name > the shipped sample.
    train_paths: list[Path] | None
    val_paths: list[Path] | None = None
    if opts["path"]:
        train_paths = resolve_paths(opts["path"], "dataset.path")
        source = ", ".join(str(p) for p in train_paths)
    elif opts["hub_name"]:
        train_paths, source = None, f"hub:{opts['hub_name']}"
    elif opts["format"] == "sample":
        train_paths, source = [SAMPLE_TRAIN], "sample"
        if opts["validation_path"] is None and not opts["val_ratio"]:
            val_paths = [SAMPLE_VALIDATION]
    else:
        raise UserError(
            f"format {opts['format']!r} needs data: set dataset.path (local file) or dataset.hub_name",
            where="dataset.path",
            hint="e.g. dataset.path=/data/train.jsonl",
        )
    if opts["validation_path"]:
        val_paths = resolve_paths(opts["validation_path"], "dataset.validation_path")
    test_paths = resolve_paths(opts["test_path"], "dataset.test_path") if opts["test_path"] else None

    report = DataReport(
        source=source,
        data_format=fmt.name,
        template=template,
        encoder=encoder.backend,
        max_length=max_length,
        packing=packing,
    )
    tok_fp = template_fingerprint(template, tokenizer, encoder)
    entry = None
    if cache_dir is not None and train_paths is not None:
        files = train_paths + (val_paths or []) + (test_paths or [])
        key = _cache_key(opts, files, tok_fp, seed)
        entry = Path(cache_dir) / f"data-{key}"
        if (entry / "meta.json").exists():
            try:
                splits, meta = _load_cache(entry)
            except Exception:  # a damaged entry is rebuilt, never trusted
                shutil.rmtree(entry, ignore_errors=True)
            else:
                report = DataReport(**{k: v for k, v in meta["report"].items() if k != "trained_share"})
                report.from_cache = True
                report.seconds = time.perf_counter() - started
                collator = _collator(packing, tokenizer, opts)
                return DataBundle(
                    splits["train"],
                    splits["eval"],
                    collator,
                    report,
                    meta["prompts"],
                    template,
                    splits["test"],
                )

    skips = _Skips(opts["on_bad_row"])
    rows = _read_sources(opts, train_paths, opts["split"], skips)
    val_rows = None
    if val_paths is not None:
        val_rows = _read_sources(opts, val_paths, None, skips)
    elif opts["hub_name"] and opts["validation_split"]:
        val_rows = _read_sources(opts, None, opts["validation_split"], skips)
    test_rows = _read_sources(opts, test_paths, None, skips) if test_paths else []
    report.rows_read = len(rows) + len(val_rows or []) + len(test_rows) + sum(skips.counts.values())
    if not rows:
        raise UserError("the data set has no rows", where=source, hint="check the file (and dataset.split)")

    train_ex = _to_examples(rows, opts, skips)
    eval_ex = _to_examples(val_rows, opts, skips) if val_rows is not None else []
    if val_rows is None and opts["val_ratio"]:
        order = list(range(len(train_ex)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * float(opts["val_ratio"])))
        held = set(order[:n_eval])
        eval_ex = [train_ex[i] for i in sorted(held)]
        train_ex = [ex for i, ex in enumerate(train_ex) if i not in held]
    if opts["max_samples"]:
        train_ex = train_ex[: int(opts["max_samples"])]
    test_ex = _to_examples(test_rows, opts, skips)
    if opts["max_eval_samples"]:
        eval_ex = eval_ex[: int(opts["max_eval_samples"])]
        test_ex = test_ex[: int(opts["max_eval_samples"])]

    train_ids, train_labels, train_lens = _tokenize(
        train_ex, opts, template, tokenizer, encoder, max_length, skips, report
    )
    eval_ids, eval_labels, eval_lens = _tokenize(
        eval_ex, opts, template, tokenizer, encoder, max_length, skips, report
    )
    test_ids, test_labels, _ = _tokenize(
        test_ex, opts, template, tokenizer, encoder, max_length, skips, report
    )
    report.rows_dropped = dict(skips.counts)
    report.dropped_examples = skips.examples
    if not train_ids:
        raise UserError(
            f"no training rows left after filtering (dropped: {dict(skips.counts) or 'none'})",
            where=source,
            hint="check dataset.fields, max_length and dataset.truncation",
        )

    lengths = [len(x) for x in train_ids + eval_ids]
    report.token_lengths = percentiles(train_lens + eval_lens)
    report.train_examples, report.eval_examples = len(train_ids), len(eval_ids)
    report.test_examples = len(test_ids)
    report.total_tokens = sum(lengths)
    report.trained_tokens = sum(
        sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in train_labels + eval_labels
    )
    train, eff = _make_dataset(train_ids, train_labels, packing, max_length)
    ev = _make_dataset(eval_ids, eval_labels, bool(packing), max_length)[0] if eval_ids else None
    test = _make_dataset(test_ids, test_labels, False, max_length)[0] if test_ids else None
    if packing:
        report.packed_rows, report.packing_efficiency = len(train), round(eff or 0.0, 4)
    else:
        report.padding_efficiency = round(sum(lengths) / (len(lengths) * max(lengths)), 4)
    prompts = _prompts(eval_ex or train_ex, template, tokenizer, encoder, int(opts["num_prompts"] or 0))
    report.seconds = time.perf_counter() - started
    if entry is not None:
        _save_cache(
            entry,
            {"train": train, "eval": ev, "test": test},
            {"report": report.to_dict(), "prompts": prompts},
        )
    return DataBundle(train, ev, _collator(packing, tokenizer, opts), report, prompts, template, test)


def _collator(packing: bool, tokenizer, opts: dict[str, Any]):
    from fine_tune.data.collate import PackedCollator, PaddingCollator

    if packing:
        return PackedCollator()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PaddingCollator(pad if pad is not None else 0, opts["pad_to_multiple_of"])
