"""The built wheel carries conf/ and the sample data: a non-editable install composes and finds
its data from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.mark.subprocess
def test_wheel_ships_configs_and_data(tmp_path: Path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("fine_tune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fine_tune/conf/config.yaml" in names
    assert "fine_tune/conf/model/mixtral.yaml" in names
    assert "fine_tune/resources/data/sample_instructions.jsonl" in names
    # Install without dependencies (they are already here) into a folder outside the checkout and
    # compose from an unrelated working directory: only the wheel's own files can be found.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fine_tune", "model=tiny_mixtral", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "num_local_experts: 4" in result.stdout
    probe = (
        "import fine_tune, fine_tune.data; from pathlib import Path; print(Path(fine_tune.__file__).parent)"
    )
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert where.stdout.strip() == str(target / "fine_tune")
