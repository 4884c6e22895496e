"""The tokenized-data cache: a sweep tokenizes once, every later job loads the result.

An entry is keyed by everything that changes the ids (options, file contents, tokenizer and
template, lengths, seed), written complete into a temp dir and renamed, and rebuilt when damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

CACHE_VERSION = "2"
SPLITS = ("train", "eval", "test")
# Options that change nothing in the cached splits.
IGNORED = ("name", "pad_to_multiple_of")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_entry(
    cache_dir: str | os.PathLike | None,
    kind: str,
    opts: dict[str, Any],
    files: list[Path] | None,
    tokenizer_fp: str,
    **params: Any,
) -> Path | None:
    """The entry directory for this data: `kind` (sft, preference) and `params` (max_length, seed,
    ...) are part of the key, as are the files' contents. None: not cached (no cache dir, or data
    from the hub, whose contents we cannot hash)."""
    if cache_dir is None or files is None:
        return None
    payload = {
        "v": CACHE_VERSION,
        "kind": kind,
        "opts": {k: v for k, v in opts.items() if k not in IGNORED},
        "files": [[str(p.resolve()), _file_digest(p)] for p in files],
        "tok": tokenizer_fp,
        **params,
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"data-{key}"


def load_cache(entry: Path | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(splits, meta) of a complete entry; None when there is none. A damaged entry is removed."""
    if entry is None or not (entry / "meta.json").exists():
        return None
    import datasets

    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        splits = {
            name: datasets.load_from_disk(str(entry / name)) if (entry / name).exists() else None
            for name in SPLITS
        }
    except Exception:  # a damaged entry is rebuilt, never trusted
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return splits, meta


def save_cache(entry: Path, splits: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write into a private temp dir, then rename: readers see a whole entry or none."""
    from datasets.utils import logging as ds_logging

    from fine_tune.utils.io import atomic_write_json, publish_dir

    entry.parent.mkdir(parents=True, exist_ok=True)
    for stale in entry.parent.glob(".data-*.tmp"):  # left by jobs killed mid-write
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 6 * 3600:
                shutil.rmtree(stale, ignore_errors=True)

    def fill(tmp: Path) -> None:
        for name, ds in splits.items():
            if ds is not None:
                ds.save_to_disk(str(tmp / name))
        atomic_write_json(tmp / "meta.json", meta)

    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # one bar per split per job is noise in a sweep's logs
    try:
        # replace=False: another job of the sweep may have won the race; its entry is as good as ours
        publish_dir(entry, fill, replace=False)
    finally:
        if bars:
            ds_logging.enable_progress_bar()
