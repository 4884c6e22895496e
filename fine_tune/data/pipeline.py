"""The steps every data builder shares: options, sources, reading with bad-row accounting, the
row-to-item conversion loop, held-out splits and caps, and the encoder.

SFT data (`build.py`) and preference pairs (`preference.py`) differ only in what a row becomes and
how it is tokenized; everything a user sees before that (which files, `file:line` of a bad row, the
seeded split, the caps) behaves the same for both because it is this code.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from fine_tune.data.formats import BUILDERS, BadRow, Format, check_columns, get_format, resolve_fields
from fine_tune.data.readers import Row, read_file, read_hub, resolve_paths
from fine_tune.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fine_tune.data.templates import SegmentEncoder

T = TypeVar("T")
# The shipped sample (dataset.format=sample): what a run trains on when it names no data.
SAMPLE_TRAIN = Path(__file__).resolve().parents[1] / "resources" / "data" / "sample_instructions.jsonl"
SAMPLE_VALIDATION = SAMPLE_TRAIN.with_suffix(".validation.jsonl")


def read_options(dataset_cfg: Mapping | None, kwargs: dict[str, Any], kind: str) -> dict[str, Any]:
    """The dataset node (a DictConfig or a dict) and keyword options, typed, checked and completed by
    the schema of the builder of `kind` (fine_tune/schema.py: the one source of the options), then
    checked against each other as a run checks them before loading (`validate.check_dataset`)."""
    from fine_tune.schema import check_group
    from fine_tune.validate import check_dataset

    raw: dict[str, Any] = {}
    if dataset_cfg is not None:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(dataset_cfg, DictConfig):
            dataset_cfg = OmegaConf.to_container(dataset_cfg, resolve=True)
        raw.update(dict(dataset_cfg))
    raw.update(kwargs)
    raw.pop("_convert_", None)
    raw["_target_"] = BUILDERS[kind]
    opts = check_group("dataset", raw)
    opts.pop("_target_")
    check_dataset(opts, kind)
    return opts


class Start(NamedTuple):
    """What both builders begin with (`start`); `cached`: (splits, meta) from the cache, else None and
    `report` is a fresh one, which `finish` times and caches with what the builder made."""

    opts: dict[str, Any]
    fmt: Format
    fields: dict[str, str]
    template: str
    encoder: SegmentEncoder
    sources: Sources
    report: Any
    entry: Path | None
    cached: tuple[dict[str, Any], dict[str, Any]] | None
    started: float

    def finish(self, splits: dict[str, Any], prompts: list[dict[str, Any]]) -> None:
        from fine_tune.data.cache import save_cache

        self.report.seconds = time.perf_counter() - self.started
        if self.entry is not None:
            save_cache(self.entry, splits, {"report": self.report.to_dict(), "prompts": prompts})


def start(
    dataset_cfg: Mapping | None,
    options: dict[str, Any],
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: Any,
    seed: int,
    report_class: Any,
) -> Start:
    """Options, format, template, encoder, sources, and the cache entry (keyed by all of them)."""
    from fine_tune.data.cache import cache_entry, load_cache
    from fine_tune.data.templates import resolve_template, template_fingerprint

    started = time.perf_counter()
    opts = read_options(dataset_cfg, options, kind)
    fmt = get_format(opts["format"], kind)
    template = (
        "none" if fmt.name == "text" else resolve_template(opts["template"], tokenizer, fmt.default_template)
    )
    encoder = make_encoder(opts, tokenizer)
    sources = resolve_sources(opts)
    fingerprint = template_fingerprint(template, tokenizer, encoder)
    entry = cache_entry(cache_dir, kind, opts, sources.files, fingerprint, seed=seed)  # max_length: in opts
    cached = load_cache(entry)
    if cached is None:
        report = report_class(source=sources.label, data_format=fmt.name, template=template)
        report.encoder, report.max_length = encoder.backend, opts["max_length"]
    else:
        report = report_class.from_dict(cached[1]["report"])
        report.from_cache, report.seconds = True, time.perf_counter() - started
    fields = resolve_fields(fmt, opts["fields"])
    return Start(opts, fmt, fields, template, encoder, sources, report, entry, cached, started)


def make_encoder(opts: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> SegmentEncoder:
    from fine_tune.data.templates import SegmentEncoder

    encoder = SegmentEncoder(tokenizer, prefer_sentencepiece=opts["encoder"] != "hf")
    if opts["encoder"] == "sentencepiece" and encoder.sp is None:
        raise UserError(
            "no sentencepiece model matches this tokenizer's vocabulary",
            where="dataset.encoder",
            hint="use dataset.encoder=auto",
        )
    return encoder


# ---- bad rows -------------------------------------------------------------------------------------
class Skips:
    """Counts dropped rows by reason, or turns a bad row into a UserError (on_bad_row=error)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, reason: str, where: str, detail: str, hint: str | None = None) -> None:
        """A bad row: an error, or (on_bad_row=skip) a counted drop."""
        if self.mode == "error":
            raise UserError(
                detail,
                where=where,
                hint=hint or "fix the row, or set dataset.on_bad_row=skip to skip bad rows",
            )
        self.drop(reason, where, detail)

    def drop(self, reason: str, where: str, detail: str) -> None:
        """A row left out by policy (too long with truncation=drop, identical answers): always counted."""
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {detail}")

    def require(self, kept: int, label: str, noun: str) -> tuple[dict[str, int], list[str]]:
        """Stop when no training rows are left; else (counts by reason, first examples) for the report."""
        if not kept:
            raise UserError(
                f"no training {noun} left after filtering (dropped: {dict(self.counts) or 'none'})",
                where=label,
                hint="check dataset.fields, max_length and dataset.truncation",
            )
        return dict(self.counts), self.examples

    def too_long(self, opts: dict[str, Any], where: str, detail: str, hint: str) -> None:
        """A row over max_length that `truncation=truncate` did not handle: dropped or an error."""
        if opts["truncation"] == "drop" or opts["on_bad_row"] == "skip":
            self.drop("too_long", where, detail)
            return
        raise UserError(detail, where=where, hint=hint)


# ---- sources and reading --------------------------------------------------------------------------
@dataclass
class Sources:
    """The files (or the hub) each split comes from; `train is None` means the hub."""

    label: str
    train: list[Path] | None
    validation: list[Path] | None = None
    test: list[Path] | None = None

    @property
    def files(self) -> list[Path] | None:
        """Every local file, for the cache key; None when data comes from the hub (not cached)."""
        if self.train is None:
            return None
        return self.train + (self.validation or []) + (self.test or [])


def resolve_sources(opts: dict[str, Any]) -> Sources:
    """Explicit path > hub name > the shipped sample (train, validation)."""
    if opts["path"]:
        train = resolve_paths(opts["path"], "dataset.path")
        sources = Sources(", ".join(str(p) for p in train), train)
    elif opts["hub_name"]:
        sources = Sources(f"hub:{opts['hub_name']}", None)
    else:  # format sample: `read_options` (validate.check_dataset) lets no other come without data
        sources = Sources("sample", [SAMPLE_TRAIN])
        if opts["validation_path"] is None and not opts["val_ratio"]:
            sources.validation = [SAMPLE_VALIDATION]
    if opts["validation_path"]:
        sources.validation = resolve_paths(opts["validation_path"], "dataset.validation_path")
    if opts["test_path"]:
        sources.test = resolve_paths(opts["test_path"], "dataset.test_path")
    return sources


def _read(opts: dict[str, Any], paths: list[Path] | None, hub_split: str | None, skips: Skips) -> list[Row]:
    if paths is None:
        return read_hub(opts["hub_name"], hub_split or "train", opts["subset"], opts["revision"])
    bad: list[tuple[str, str, str]] | None = [] if opts["on_bad_row"] == "skip" else None
    rows: list[Row] = []
    for p in paths:
        rows.extend(read_file(p, opts["file_type"], bad))
    for reason, where, detail in bad or []:
        skips.add(reason, where, detail)
    return rows


@dataclass
class RawSplits:
    train: list[Row]
    validation: list[Row] | None  # None: no validation source (val_ratio may split train)
    test: list[Row]
    rows_read: int  # every row seen, the unreadable ones included


def read_sources(opts: dict[str, Any], sources: Sources, skips: Skips) -> RawSplits:
    """Every row of every split, read before anything is converted, so bad files fail first."""
    rows = _read(opts, sources.train, opts["split"], skips)
    validation = None
    if sources.validation is not None:
        validation = _read(opts, sources.validation, None, skips)
    elif sources.train is None and opts["validation_split"]:  # training rows from the hub: its split too
        validation = _read(opts, None, opts["validation_split"], skips)
    test = _read(opts, sources.test, None, skips) if sources.test else []
    read = len(rows) + len(validation or []) + len(test) + sum(skips.counts.values())
    if not rows:
        raise UserError(
            "the data set has no rows", where=sources.label, hint="check the file (and dataset.split)"
        )
    return RawSplits(rows, validation, test, read)


def convert_rows(
    rows: list[Row], fmt: Format, fields: dict[str, str], convert: Callable[[Row], T], skips: Skips
) -> list[T]:
    """Check each file's columns once, then convert row by row; a BadRow is counted or raised."""
    by_file: dict[str, set[str]] = {}
    for row in rows:
        by_file.setdefault(row.source or row.where, set()).update(row.data)
    for name, columns in by_file.items():
        check_columns(fmt, fields, columns, name)
    out = []
    for row in rows:
        try:
            out.append(convert(row))
        except BadRow as bad:
            skips.add(bad.reason, row.where, f"{bad.detail} (row has fields {sorted(row.data)})")
    return out


def load_items(
    opts: dict[str, Any],
    sources: Sources,
    fmt: Format,
    fields: dict[str, str],
    convert: Callable[[Row], T],
    skips: Skips,
    seed: int,
) -> tuple[int, list[T], list[T], list[T]]:
    """(rows read, train, eval, test): every split read, its rows converted by `convert`, then the
    held-out split and the caps applied."""
    raw = read_sources(opts, sources, skips)

    def each(rows: list[Row]) -> list[T]:
        return convert_rows(rows, fmt, fields, convert, skips)

    held = each(raw.validation) if raw.validation is not None else None
    return raw.rows_read, *split_and_cap(each(raw.train), held, each(raw.test), opts, seed)


def split_and_cap(
    train: list[T], held: list[T] | None, test: list[T], opts: dict[str, Any], seed: int
) -> tuple[list[T], list[T], list[T]]:
    """(train, eval, test): a seeded `val_ratio` share held out when there is no validation source,
    then `max_samples` / `max_eval_samples` caps that keep file order."""
    evaluation = held if held is not None else []
    if held is None and opts["val_ratio"]:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        chosen = set(order[: max(1, round(len(order) * float(opts["val_ratio"])))])
        evaluation = [train[i] for i in sorted(chosen)]
        train = [item for i, item in enumerate(train) if i not in chosen]
    if opts["max_samples"]:
        train = train[: int(opts["max_samples"])]
    if opts["max_eval_samples"]:
        evaluation = evaluation[: int(opts["max_eval_samples"])]
        test = test[: int(opts["max_eval_samples"])]
    return train, evaluation, test


def held_out_prompts(
    items: list[dict[str, Any]], template: str, tokenizer: PreTrainedTokenizerBase, encoder: SegmentEncoder
) -> list[dict[str, Any]]:
    """Generation prompts for eval-time samples: each item ({messages, reference, where, ...}) with
    its `prompt_ids` and `prompt_text`, rendered exactly as in training."""
    from fine_tune.data.templates import encode_prompts

    ids = encode_prompts([item["messages"] for item in items], template, tokenizer, encoder)
    return [
        {"prompt_ids": x, "prompt_text": tokenizer.decode(x), **item}
        for x, item in zip(ids, items, strict=True)
    ]
