"""What a newcomer sees: where the run went, no run directory for what trained nothing, an answer
at once without the hub, a quiet terminal, a progress bar only on a terminal, a --help without
internals; and what `resume=true` composes."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY, child_env, cli, compose, tiny_run

from fine_tune.errors import UserError
from fine_tune.resume_config import check_unchanged, with_saved_overrides


@pytest.mark.subprocess
def test_modes_and_runs_stopped_before_training_leave_no_run_directory(tmp_path: Path):
    (tmp_path / "broken.jsonl").write_text('{"instruction": "Say hi.", "output": \n')
    for args, code in (
        (["plan=true", "validate=true", "preview=true"], 0),
        (["trainer.precision=fp64"], 2),  # a config error
        (["dataset=alpaca", "dataset.path=broken.jsonl"], 2),  # a data error, met once the run started
    ):
        result = cli(["logger=none", "trainer=cpu", *args], cwd=tmp_path)
        assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
        assert not (tmp_path / "outputs").exists(), args
    # the run had said where it would write; it says what became of that directory
    assert "run directory: outputs/train/" in result.stdout
    assert "nothing was trained: removed outputs/train/" in result.stdout


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("network", "reason"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached"),  # nothing there
    ],
    ids=["offline", "unreachable"],
)
def test_a_hub_model_without_the_hub_fails_at_once_with_the_hint(network, reason, tmp_path: Path):
    extra = {"HF_HOME": str(tmp_path / "hf"), **network}  # an empty hub cache
    result = cli(["model=mistral_7b", "validate=true", "logger=none"], env=extra, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert reason in result.stderr and "model.tokenizer=mistral_v1" in result.stderr
    assert "Retrying" not in output and "Traceback" not in output


@pytest.mark.subprocess
def test_help_lists_only_the_groups_users_choose():
    result = cli(["--help"], timeout=120)
    assert result.returncode == 0
    assert "lora: " in result.stdout and "fine_tune_schema" not in result.stdout


# bitsandbytes logs this while it is imported, on CPUs with AVX512-BF16 only: the hook below logs it
# the same way, at the same moment, on any CPU.
IMPORT_HOOK = """
import importlib.abc, logging, runpy, sys

class KernelsWarning(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes":
            sys.meta_path.remove(self)
            print("bitsandbytes imported", file=sys.stderr)
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"
            )
        return None

sys.meta_path.insert(0, KernelsWarning())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("module", ["fine_tune", "fine_tune.generate", "fine_tune.export"])
def test_a_clean_run_prints_no_library_warnings(module: str, tmp_path: Path):
    args = {
        "fine_tune": [*TINY, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"],
        "fine_tune.generate": [f"run={tiny_run()}", "prompt=Hi", "max_new_tokens=2"],
        "fine_tune.export": [f"run={tiny_run()}", "merge=true", f"out={tmp_path / 'merged'}"],
    }[module]
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_HOOK, module, *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "bitsandbytes imported" in output  # the hook ran: the warning was logged
    for noise in ("gemm_4bit_forward", "FutureWarning", "PAD/BOS/EOS", "HTTP Request"):
        assert noise not in output, noise


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_shows_only_on_a_terminal():
    from transformers import TrainerState

    from fine_tune.training.progress import ProgressBar

    def drive(stream: io.StringIO, start: int) -> str:
        """Train from `start` to step 8; what the bar would draw at the end (redraws are timed)."""
        state = TrainerState(max_steps=8, global_step=start, num_input_tokens_seen=100)
        bar = ProgressBar(stream)
        bar.on_train_begin(None, state, None)
        for step in range(start + 1, 9):
            state.global_step, state.num_input_tokens_seen = step, state.num_input_tokens_seen + 50
            bar.on_step_end(None, state, None)
        drawn = bar.bar.format_meter(**bar.bar.format_dict) if bar.bar is not None else ""
        bar.on_train_end(None, state, None)
        assert bar.bar is None
        return drawn + stream.getvalue()

    shown = drive(Terminal(), start=2)  # a resumed run: the bar starts at its step
    assert "2/8" in shown and "8/8" in shown and "tok/s" in shown and "<" in shown  # elapsed<left
    assert drive(io.StringIO(), start=2) == ""  # a pipe or a file: the log stays one line per step
    assert drive(Terminal(), start=8) == ""  # resumed at the end: nothing to show


def saved_run(tmp_path: Path, overrides: list[str]) -> Path:
    """A run dir holding what Hydra saves for `python -m fine_tune OVERRIDES`."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    OmegaConf.save(compose(overrides), run / ".hydra" / "config.yaml")
    return run


def test_resume_composes_the_runs_own_overrides_first(tmp_path: Path, monkeypatch):
    run = saved_run(tmp_path, ["trainer=cpu", "trainer.max_steps=8", "+dataset.note=mine"])
    where = f"hydra.run.dir={run}"
    assert with_saved_overrides(["fine_tune", "resume=true", where]) == [
        "fine_tune",
        "trainer=cpu",
        "trainer.max_steps=8",
        "+dataset.note=mine",
        "resume=true",
        where,
    ]
    again = ["fine_tune", "trainer=cpu", "+dataset.note=mine", "resume=true", where]
    assert with_saved_overrides(again) == [again[0], "trainer.max_steps=8", *again[1:]]  # given: not twice
    for unchanged in (["fine_tune", where], ["fine_tune", "-m", "resume=true", where]):
        assert with_saved_overrides(unchanged) == unchanged  # not a resume; a sweep
    monkeypatch.setenv("FINE_TUNE_RUN_DIR", str(run))  # torchrun: the run dir comes from the environment
    assert with_saved_overrides(["fine_tune", "resume=true"])[1] == "trainer=cpu"


def test_resume_refuses_a_config_that_differs_from_the_saved_one(tmp_path: Path):
    run = saved_run(tmp_path, list(TINY))
    check_unchanged(compose([*TINY, "resume=true"]), run)  # only `resume` may differ
    with pytest.raises(UserError) as error:
        check_unchanged(compose([*TINY, "trainer.max_steps=9", "lora.r=4"]), run)
    assert error.value.where == "resume"
    assert "trainer.max_steps: 8 -> 9" in error.value.message and "lora.r: 16 -> 4" in error.value.message


def test_the_hub_is_asked_only_for_names_that_are_not_paths(tmp_path: Path):
    from fine_tune.models.hub import named_in

    assert named_in(compose(["model=mistral_7b"])) == ["mistralai/Mistral-7B-v0.1"]
    assert named_in(compose([])) == []  # tiny model, tokenizer from mistral-common, shipped data
    local = ["model=local", f"model.name_or_path={tmp_path}", "model.tokenizer=/no/such/dir"]
    assert named_in(compose(local)) == []  # a missing local path is the loader's error, not the hub's
    assert named_in(compose(["dataset=alpaca", "dataset.hub_name=yahma/alpaca-cleaned"])) == [
        "yahma/alpaca-cleaned"
    ]
