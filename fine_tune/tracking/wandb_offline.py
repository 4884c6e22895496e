"""Read W&B offline run files (`run-<id>.wandb`) back without a server.

wandb >= 0.2x no longer ships a Python reader for its transaction log (the old
`wandb.sdk.internal.datastore` is gone; the Go core writes it), yet offline runs are exactly the
ones nobody can look at in a dashboard. The format is a LevelDB-style log: a 7-byte file header
(":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each `crc32 | length | type` +
payload, where FULL/FIRST/MIDDLE/LAST chunks join into serialized `wandb_internal_pb2.Record`s.
Used by the tests to check what each job logged, and handy for debugging a run before `wandb sync`.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | os.PathLike) -> Iterator[Any]:
    """Yield every `Record` protobuf in a `.wandb` file; a torn tail (run still writing) ends early."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = Path(path).read_bytes()
    if len(data) < _HEADER.size:
        return
    ident, magic, _version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # block trailer padding
            pos += left
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        pos += _CHUNK.size
        payload = data[pos : pos + length]
        pos += length
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            return
        if kind in (_FULL, _FIRST):
            pending = payload
        elif kind in (_MIDDLE, _LAST):
            pending += payload
        else:
            return
        if kind in (_FULL, _LAST):
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _values(items: Any) -> dict[str, Any]:
    """{key: value} of protobuf config / history / summary items (nested keys joined by `/`)."""
    return {"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in items}


def read_run(path: str | os.PathLike) -> dict[str, Any]:
    """Summarize one offline run: its identity, config, per-step history rows, and final summary."""
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None}
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(
                run_id=run.run_id,
                project=run.project,
                entity=run.entity,
                group=run.run_group,
                job_type=run.job_type,
                name=run.display_name,
                tags=list(run.tags),
                notes=run.notes,
            )
            out["config"].update(_values(run.config.update))
        elif kind == "config":
            out["config"].update(_values(record.config.update))
        elif kind == "history":
            out["history"].append(_values(record.history.item))
        elif kind == "summary":
            out["summary"].update(_values(record.summary.update))
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every `run-*.wandb` file under `root` (a run dir or a whole sweep), sorted by path."""
    return sorted(Path(root).rglob("run-*.wandb"))
