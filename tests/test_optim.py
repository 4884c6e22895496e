"""Any optimizer class path works: the factory passes only the arguments the class takes, drops the
inherited AdamW keys it lacks with a note, and refuses keys the user added that it cannot take."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import FAST, ROOT, cli, compose

from fine_tune.errors import UserError
from fine_tune.training.optim import build_optimizer_factory, inherited_keys
from fine_tune.validate import check_config

README_SGD = "optim.optimizer._target_=torch.optim.SGD"


def built(overrides: list[str]) -> torch.optim.Optimizer:
    cfg = compose(["logger=none", *overrides])
    check_config(cfg)  # what a run checks first
    return build_optimizer_factory(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(3))])


def test_inherited_keys_are_the_reference_adamw_keys():
    assert inherited_keys() == {"lr", "weight_decay", "betas", "eps"}


def test_readme_sgd_override_builds_sgd_and_says_what_it_dropped(caplog):
    with caplog.at_level(logging.WARNING, logger="fine_tune"):
        optimizer = built([README_SGD])
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == pytest.approx(compose().model.lr)
    (note,) = [r.getMessage() for r in caplog.records if "optim.optimizer" in r.getMessage()]
    assert "torch.optim.sgd.SGD takes no betas, eps; not passed" in note


def test_sgd_option_passes_momentum_and_no_note(caplog):
    with caplog.at_level(logging.WARNING, logger="fine_tune"):
        optimizer = built(["optim=sgd"])
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["momentum"] == 0.9
    assert not [r for r in caplog.records if "optim.optimizer" in r.getMessage()]


def test_null_leaves_the_class_default():
    optimizer = built(["optim.optimizer.weight_decay=null"])
    assert (
        optimizer.param_groups[0]["weight_decay"]
        == torch.optim.AdamW([torch.zeros(1)]).defaults["weight_decay"]
    )


@pytest.mark.parametrize(
    "overrides",
    [[README_SGD, "+optim.optimizer.momentun=0.9"], ["+optim.optimizer.nesterov=true"]],
    ids=["typo", "adamw_has_no_nesterov"],
)
def test_a_key_the_user_added_that_the_class_cannot_take_is_refused(overrides):
    key = overrides[-1].split("=")[0].lstrip("+")
    cfg = compose(["logger=none", *overrides])
    for check in (check_config, lambda c: build_optimizer_factory(c.optim.optimizer)):
        with pytest.raises(UserError) as error:
            check(cfg)
        assert error.value.where == key


@pytest.mark.subprocess
@pytest.mark.slow
def test_readme_sgd_command_trains(tmp_path: Path):
    """The README's line, as a user types it (with short CPU settings)."""
    assert f"`{README_SGD}`" in (ROOT / "README.md").read_text()
    result = cli([*FAST, "trainer.max_steps=4", README_SGD, f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "finished"
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4
    assert "SGD takes no betas, eps; not passed" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("option", "size", "expected"),
    [
        ("paged_adamw_8bit", 1024, ["does not page on CPU", "1 of 1 trainable tensors have fewer than 4096"]),
        ("paged_adamw_32bit", 8192, ["does not page on CPU"]),
        ("adamw_8bit", 1024, ["1 of 1 trainable tensors have fewer than 4096"]),
        ("adamw_8bit", 8192, []),  # really 8-bit states, on CPU too
        ("adamw_torch", 1024, []),
    ],
)
def test_bitsandbytes_fallbacks_are_noted_when_the_optimizer_is_made(option, size, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="fine_tune"):
        param = torch.nn.Parameter(torch.zeros(size))
        optimizer = build_optimizer_factory(compose([f"optim={option}"]).optim.optimizer)([param])
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("optim: ")]
    assert len(notes) == len(expected)
    for note, text in zip(notes, expected, strict=True):
        assert text in note
    param.grad = torch.ones(size)
    optimizer.step()
    state = optimizer.state[param]
    states = [state[k] for k in ("state1", "exp_avg") if k in state]
    assert states[0].dtype == (torch.uint8 if option == "adamw_8bit" and size >= 4096 else torch.float32)
