"""fine_tune.utils.io: whole or absent, and published with the permissions the user's umask asks for."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fine_tune.utils import io


@pytest.fixture(params=[0o022, 0o027, 0o002])
def mask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_changing_it(mask):
    assert io.umask() == mask
    assert io.umask() == mask


def test_files_follow_the_umask(tmp_path, mask):
    written = [
        io.atomic_write_text(tmp_path / "a.md", "x"),
        io.atomic_write_json(tmp_path / "new" / "b.json", {"a": 1}),
        io.atomic_write_bytes(tmp_path / "c.bin", b"\x00"),
    ]
    with io.atomic_file(tmp_path / "d.png") as tmp:
        tmp.write_bytes(b"png")
    written.append(tmp_path / "d.png")
    assert [mode(p) for p in written] == [0o666 & ~mask] * 4
    assert mode(tmp_path / "new") == 0o777 & ~mask
    assert json.loads((tmp_path / "new" / "b.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "c.bin", "d.png", "new"]  # no temp left


def test_published_directory_follows_the_umask(tmp_path, mask):
    def fill(work: Path) -> None:
        (work / "weights.bin").write_bytes(b"w")
        (work / "sub").mkdir()

    target = io.publish_dir(tmp_path / "merged", fill)
    assert mode(target) == 0o777 & ~mask
    assert mode(target / "weights.bin") == 0o666 & ~mask and mode(target / "sub") == 0o777 & ~mask


def test_rewriting_keeps_a_mode_the_user_chose(tmp_path):
    path = io.atomic_write_text(tmp_path / "status.json", "{}")
    path.chmod(0o600)
    io.atomic_write_text(path, "{}\n")
    assert mode(path) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = io.atomic_write_text(tmp_path / "metrics.json", "old")
    with pytest.raises(RuntimeError), io.atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_fill_leaves_the_old_directory_and_no_temporary(tmp_path):
    io.publish_dir(tmp_path / "adapter", lambda d: (d / "v1").write_text("1"))

    def crash(work: Path) -> None:
        (work / "v2").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        io.publish_dir(tmp_path / "adapter", crash)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["v1"]


def test_publish_replaces_or_keeps_the_winner_of_a_race(tmp_path):
    io.publish_dir(tmp_path / "out", lambda d: (d / "v1").write_text("1"))
    io.publish_dir(tmp_path / "out", lambda d: (d / "v2").write_text("2"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v2"]
    io.publish_dir(tmp_path / "out", lambda d: (d / "v3").write_text("3"), replace=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
