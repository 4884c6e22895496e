"""Atomic writes, in one place: a crash or a kill never leaves a half-written file or directory under
its final name, and what we publish gets the permissions the user's umask asks for.

Everything is written to a hidden temporary sibling (same file system, so the rename is atomic)
and renamed into place when whole. `tempfile` creates those siblings 0600 / 0700 for privacy; we
widen them to `0o666 & ~umask` / `0o777 & ~umask` (or keep the mode of the file being replaced),
as a plain `open()` / `mkdir()` would, so a merged model or a sweep summary is readable by whoever
the user's umask lets read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path, default: int) -> int:
    """Keep the mode of the file we replace (a user's chmod survives a rewrite); else the umask's."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return default & ~umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_file(p) as tmp: write(tmp)`: `p` appears, whole, when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, _mode_for(path, 0o666))
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as handle:  # on disk before the rename, or a power cut leaves it empty
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _trash_prefix(path: Path) -> str:
    return f".deleting-{path.name}-"


def remove_dir(path: Path) -> None:
    """Rename first, delete second: a kill during deletion leaves a hidden leftover, never a
    half-deleted directory under its real name (which a reader would trust)."""
    if not path.exists():
        return
    trash = path.with_name(f"{_trash_prefix(path)}{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(source: Path, target: Path) -> None:
    """Move a fully written directory to `target` (same file system), replacing what was there."""
    remove_dir(target)
    os.replace(source, target)


def _partial_prefix(target: Path) -> str:
    return f".{target.name}."


def remove_partial_publishes(target: str | os.PathLike) -> None:
    """The hidden siblings of `target` that a kill during `publish_dir` leaves behind: the copy being
    written, and the previous `target` killed while being deleted (`remove_dir`)."""
    target = Path(target)
    for pattern in (f"{_partial_prefix(target)}*.tmp", f"{_trash_prefix(target)}*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def publish_dir(target: str | os.PathLike, fill: Callable[[Path], Any], replace: bool = True) -> Path:
    """`fill(tmp)` into a hidden sibling of `target`, then rename it to `target`.

    replace=False is for caches that racing processes fill with the same content: an existing
    `target` wins and our copy is dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=_partial_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        work.chmod(_mode_for(target, 0o777))
        fill(work)
        if replace:
            replace_dir(work, target)
        else:
            with contextlib.suppress(OSError):  # another process won the race
                os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one record; a line is written whole by a single write() so readers never see half."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, default=float) + "\n")
