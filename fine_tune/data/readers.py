"""Reading rows from local files (or the hub) into plain dicts that remember where they came from.

Every row carries its origin (`file:line` for JSONL, `file:row N` otherwise) so that a bad row can be
reported where the user can open it, instead of as an index into a shuffled dataset.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fine_tune.errors import UserError

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class Row:
    """One raw record and where it came from (for error messages that point at the file)."""

    data: dict[str, Any]
    where: str
    source: str = ""  # the file (or hub name) the row came from: columns are checked per source


def _kind(path: Path, file_type: str | None) -> str:
    if file_type:
        file_type = file_type.lower().lstrip(".")
        if file_type not in set(SUFFIXES.values()):
            raise UserError(
                f"unknown file type {file_type!r}",
                where="dataset.file_type",
                hint=f"use one of {sorted(set(SUFFIXES.values()))}, or leave it unset to use the suffix",
            )
        return file_type
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"cannot tell the format of {path.name} from its suffix {path.suffix!r}",
            where=str(path),
            hint=f"name it with one of {sorted(SUFFIXES)} or set dataset.file_type",
        )
    return kind


def resolve_paths(path: str | list[str] | tuple[str, ...], key: str = "dataset.path") -> list[Path]:
    """Expand a path, a directory or a glob into files, failing early when nothing matches."""
    items = [path] if isinstance(path, str | Path) else list(path)
    out: list[Path] = []
    for item in items:
        p = Path(str(item)).expanduser()
        if any(ch in str(item) for ch in "*?["):
            matches = sorted(Path(p.anchor or ".").glob(str(p.relative_to(p.anchor)) if p.anchor else str(p)))
            if not matches:
                raise UserError(
                    f"no file matches {item!r}", where=key, hint="check the glob and the working dir"
                )
            out.extend(m for m in matches if m.is_file())
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES)
            if not files:
                raise UserError(
                    f"directory {p} holds no data files",
                    where=key,
                    hint=f"expected files ending in {sorted(SUFFIXES)}",
                )
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(
                f"file not found: {p}",
                where=key,
                hint="paths are resolved against the directory you launched from (Hydra does not chdir); "
                "use an absolute path or ${hydra:runtime.cwd}/...",
            )
    return out


# utf-8-sig: files exported from Excel or Windows tools start with a BOM, which would otherwise
# become part of the first column's name (or break json.loads).


def read_file(
    path: Path,
    file_type: str | None = None,
    bad_rows: list[tuple[str, str, str]] | None = None,
) -> list[Row]:
    """Read one file into rows.

    Malformed JSONL lines raise with `file:line` unless `bad_rows` is given (on_bad_row=skip), in which
    case they are recorded there as (reason, where, detail) and reading continues.
    """
    kind = _kind(path, file_type)
    try:
        if kind == "jsonl":
            return _read_jsonl(path, bad_rows)
        if kind == "json":
            return _read_json(path)
        if kind in ("csv", "tsv"):
            return _read_csv(path, "\t" if kind == "tsv" else ",")
        return _read_parquet(path)
    except UserError:
        raise
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})",
            where=str(path),
            hint="re-encode the file as UTF-8",
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", where=str(path)) from exc


def _read_jsonl(path: Path, bad_rows: list[tuple[str, str, str]] | None) -> list[Row]:
    rows: list[Row] = []
    with open(path, encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                if bad_rows is None:
                    raise UserError(
                        f"malformed JSON line: {exc.msg} (column {exc.colno})",
                        where=where,
                        hint="fix the line, or set dataset.on_bad_row=skip to skip bad rows",
                    ) from exc
                bad_rows.append(("malformed_json", where, exc.msg))
                continue
            if not isinstance(obj, dict):
                if bad_rows is None:
                    raise UserError(
                        f"expected a JSON object per line, got {type(obj).__name__}",
                        where=where,
                        hint="each line must be one {...} record",
                    )
                bad_rows.append(("not_an_object", where, type(obj).__name__))
                continue
            rows.append(Row(obj, where, str(path)))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        # A JSONL file saved as .json is the most common cause; say so.
        hint = (
            "the file looks like JSON Lines; rename it to .jsonl"
            if text.lstrip().startswith("{") and exc.msg.startswith("Extra data")
            else "fix the JSON, or check that the file is complete"
        )
        raise UserError(f"malformed JSON: {exc.msg}", where=f"{path}:{exc.lineno}", hint=hint) from exc
    if isinstance(obj, dict):
        # {"data": [...]} / {"train": [...]} layouts: take the single list value.
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            obj = lists[0]
        else:
            raise UserError(
                "expected a JSON array of records (or an object holding one array)",
                where=str(path),
                hint="use a list of {...} records, or JSON Lines",
            )
    if not isinstance(obj, list):
        raise UserError(f"expected a JSON array of records, got {type(obj).__name__}", where=str(path))
    lines = _element_lines(text) if text.lstrip().startswith("[") else None
    if lines is not None and len(lines) != len(obj):
        lines = None
    shared_lines = lines is not None and len(set(lines)) < len(lines)  # e.g. a one-line array
    rows = []
    for i, item in enumerate(obj):
        if lines is None:
            where = f"{path}[{i}]"
        else:
            where = f"{path}:{lines[i]}" + (f" (record {i})" if shared_lines else "")
        if not isinstance(item, dict):
            raise UserError(f"record {i} is a {type(item).__name__}, not an object", where=where)
        rows.append(Row(item, where, str(path)))
    return rows


def _element_lines(text: str) -> list[int] | None:
    """The line on which each element of a top-level JSON array starts, so errors can say file:line."""
    decoder = json.JSONDecoder()
    idx = text.index("[") + 1
    n = len(text)
    lines: list[int] = []
    line, counted = 1, 0
    try:
        while True:
            while idx < n and text[idx] in " \t\r\n,":
                idx += 1
            if idx >= n or text[idx] == "]":
                return lines
            line += text.count("\n", counted, idx)
            counted = idx
            lines.append(line)
            _, idx = decoder.raw_decode(text, idx)
    except json.JSONDecodeError:
        return None


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            raise UserError(
                "CSV file has no header row", where=str(path), hint="the first line must name the columns"
            )
        # line_num after reading a record is the physical line it ended on (multi-line cells included).
        return [Row(dict(rec), f"{path}:{reader.line_num}", str(path)) for rec in reader]


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow comes with datasets
        raise UserError("reading Parquet needs pyarrow", hint="pip install pyarrow") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise UserError(f"unreadable Parquet file: {exc}", where=str(path)) from exc
    return [Row(rec, f"{path}:row {i + 1}", str(path)) for i, rec in enumerate(table.to_pylist())]


def read_hub(
    hub_name: str, split: str = "train", subset: str | None = None, revision: str | None = None
) -> list[Row]:
    """Load a dataset by hub name; only used when the hub is reachable (never in tests)."""
    import datasets

    try:
        ds = datasets.load_dataset(hub_name, subset, split=split, revision=revision)
    except Exception as exc:
        raise UserError(
            f"could not load {hub_name!r} (split {split!r}) from the hub: {exc}",
            where="dataset.hub_name",
            hint="check the name and your network, or download it and use dataset.path",
        ) from exc
    return [Row(rec, f"{hub_name}[{split}][{i}]", hub_name) for i, rec in enumerate(ds)]
