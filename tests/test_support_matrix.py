"""docs/support-matrix.md and the README's "What combines with what" are generated from
fine_tune/support_matrix.py, which must name every option of every config group, and whose refused
combinations validation really refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import CONF, compose

from fine_tune import support_matrix as matrix
from fine_tune.errors import UserError


def test_generated_doc_and_readme_section_are_current():
    assert matrix.stale() == [], "run: python -m fine_tune.support_matrix"


def test_every_config_option_has_a_row_and_every_row_a_real_option():
    assert matrix.drift() == []


def test_a_new_option_without_a_row_fails_the_drift_check(tmp_path: Path):
    """What the check above catches: an option added to conf/ and forgotten here, or one removed
    from conf/ while its row stays."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "optim" / "lion.yaml").write_text("optimizer: {_target_: lion_pytorch.Lion}\n")
    (conf / "lora" / "olora.yaml").unlink()
    row = next(f.name for f in matrix.FEATURES if f.options.get("lora") == ("olora",))
    assert matrix.drift(conf) == [
        f"row {row!r} names conf/lora/olora.yaml, which does not exist",
        "conf/optim/lion.yaml is in no row of FEATURES (fine_tune/support_matrix.py)",
    ]


def test_cells_have_a_known_status_and_name_real_docs():
    docs = matrix.ROOT / "docs"
    for feature in matrix.FEATURES:
        for cell in feature.cells:
            assert matrix.status(cell) in matrix.STATUSES, f"{feature.name}: {cell!r}"
            for doc in (w.strip(",.") for w in cell.split() if w.strip(",.").endswith(".md")):
                assert (docs / doc).is_file(), f"{feature.name}: {doc} is not in docs/"


@pytest.mark.parametrize("refusal", matrix.REFUSED, ids=lambda r: r.where + ":" + "+".join(r.overrides))
def test_refused_combinations_are_refused_where_and_when_the_matrix_says(refusal, monkeypatch):
    """ "start": every run's first check (check_config) refuses it; "validate": it passes that check
    and validate=true's building of the weightless objects refuses it."""
    from fine_tune.validate import check_config, instantiate_light

    for key, value in refusal.env:
        monkeypatch.setenv(key, value)
    cfg = compose(["logger=none", *refusal.overrides])
    if refusal.when == "start":
        with pytest.raises(UserError) as error:
            check_config(cfg)
    else:
        check_config(cfg)  # passes every run's first check...
        with pytest.raises(UserError) as error:
            instantiate_light(cfg)  # ...and validate=true refuses it
    assert error.value.where == refusal.where
