"""Bad configurations and inputs: each exits non-zero with a short message naming the offending key
or file, prints no traceback, and leaves no run directory that looks finished.

Every case is refused by one of a few stages (Hydra's composition and the schema's types, the config
checks of `fine_tune.validate`, secrets, resume, data, model loading). The command line is run for
one or two cases of each stage (`CLI`): they show how each stage's refusal reaches the user. The
other cases are refused before anything loads, so they are checked in this process, through the same
composition and `check_config` the command runs (`IN_PROCESS`): a subprocess each cost seconds of
imports and told nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli, compose, status

from fine_tune.errors import UserError

TOKEN = "hf_" + "Zq8" * 12  # fake, token-shaped

# (id, extra overrides, text the message must contain). {data} is a folder of bad data files.
CASES = [
    ("unknown_group_option", ["lora=nope"], "lora/nope"),
    ("unknown_key", ["lora.foo=1"], "lora.foo"),
    ("rank_not_int", ["lora.r=abc"], "lora.r"),
    ("rank_zero", ["lora.r=0"], "lora.r"),
    ("dropout_out_of_range", ["lora.lora_dropout=1.5"], "lora.lora_dropout"),
    ("missing_data_file", ["dataset=alpaca", "dataset.path={data}/missing.jsonl"], "missing.jsonl"),
    ("malformed_jsonl_line", ["dataset=alpaca", "dataset.path={data}/broken.jsonl"], "broken.jsonl"),
    (
        "rows_without_fields",
        ["dataset=alpaca", "dataset.path={data}/wrong_fields.jsonl"],
        "wrong_fields.jsonl",
    ),
    ("unknown_model_path", ["model=local", "model.name_or_path=/nonexistent/model"], "model.name_or_path"),
    ("unknown_model_family", ["model.family=gpt2"], "model.family"),
    ("bad_precision", ["trainer.precision=fp64"], "trainer.precision"),
    ("bad_dtype", ["model.dtype=float8"], "model.dtype"),
    ("bad_attention", ["model.attn_implementation=magic"], "model.attn_implementation"),
    ("flex_attention_on_cpu", ["model.attn_implementation=flex_attention"], "model.attn_implementation"),
    ("unknown_optimizer", ["optim.optimizer._target_=torch.optim.NoSuchAdam"], "optim.optimizer"),
    ("optimizer_bad_argument", ["+optim.optimizer.momentum_decay=3"], "optim.optimizer.momentum_decay"),
    ("experts_on_dense_model", ["lora.experts=true"], "lora.experts"),
    ("negative_steps", ["trainer.max_steps=-5"], "trainer.max_steps"),
    ("zero_batch", ["trainer.per_device_train_batch_size=0"], "trainer.per_device_train_batch_size"),
    ("max_length_not_int", ["dataset.max_length=long"], "dataset.max_length"),
    ("bad_quant_kind", ["quant.kind=nf5"], "quant.kind"),
    ("negative_lr", ["optim.lr=-1e-4"], "optim.lr"),
    ("bad_on_bad_row", ["dataset.on_bad_row=maybe"], "dataset.on_bad_row"),
    ("unknown_dataset_option", ["+dataset.colour=red"], "dataset.colour"),
    ("no_data_source", ["dataset=alpaca"], "needs data: set dataset.path"),
    ("unknown_top_level_key", ["+lr=1e-4"], "error: lr:"),
    ("plan_not_bool", ["plan=maybe"], "plan"),
    ("negative_seed", ["seed=-1"], "seed"),
    ("negative_workers", ["trainer.dataloader_num_workers=-1"], "trainer.dataloader_num_workers"),
    ("bad_lora_bias", ["lora.bias=sometimes"], "lora.bias"),
    ("unknown_scheduler", ["optim.scheduler=sometimes"], "optim.scheduler"),
    ("bad_compute_dtype", ["quant=nf4", "quant.compute_dtype=nope"], "quant.compute_dtype"),
    ("heads_not_multiple_of_kv", ["model.architecture.num_key_value_heads=3"], "num_key_value_heads"),
    ("seed_not_int", ["seed=abc"], "seed"),
    ("missing_checkpoint", ["resume=/nonexistent/checkpoint-5"], "resume"),
    ("token_in_config", [f"+hf_token={TOKEN}"], "hf_token"),
    ("bad_lora_targets", ["lora.target_modules=[nope_proj]"], "lora.target_modules"),
]

# The command line for one or two cases per stage; every other case runs in this process.
CLI_IDS = {
    "unknown_group_option",  # Hydra: composition
    "rank_not_int",  # the schema's types
    "unknown_top_level_key",  # the schema: a key it does not have
    "rank_zero",  # fine_tune.validate
    "missing_data_file",  # data
    "malformed_jsonl_line",
    "rows_without_fields",
    "unknown_model_path",  # model
    "missing_checkpoint",  # resume
    "token_in_config",  # secrets
    "bad_lora_targets",  # the adapter: targets are matched against the built model
}
CLI = [c for c in CASES if c[0] in CLI_IDS]
IN_PROCESS = [c for c in CASES if c[0] not in CLI_IDS]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad-data")
    good = json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."})
    (path / "broken.jsonl").write_text(good + "\n" + '{"instruction": "Say hi", "output": \n' + good + "\n")
    (path / "wrong_fields.jsonl").write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    return path


def looks_finished(run_dir: Path) -> bool:
    return (
        status(run_dir) == "finished" or (run_dir / "metrics.json").exists() or (run_dir / "adapter").exists()
    )


@pytest.mark.subprocess
@pytest.mark.parametrize(("overrides", "needle"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_bad_configuration_fails_cleanly(overrides, needle, data_dir: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    args = [
        "logger=none",
        "trainer=cpu",
        "trainer.max_steps=2",
        *(o.format(data=data_dir) for o in overrides),
    ]
    result = cli([*args, f"hydra.run.dir={run_dir}"], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    assert needle in output, output[-2000:]
    assert not looks_finished(run_dir)
    if result.returncode == 2:  # our own errors: one short paragraph
        message = result.stderr[result.stderr.index("fine_tune error:") :]
        assert len(message.strip().splitlines()) <= 3, message
    assert TOKEN not in output
    if run_dir.exists():
        for path in run_dir.rglob("*"):
            assert not path.is_file() or TOKEN not in path.read_text(errors="ignore"), path


def refusal(overrides: list[str]) -> BaseException | None:
    """What stops `python -m fine_tune OVERRIDES` before anything loads: an error of the composition
    (Hydra, the schema's types) or the UserError of `check_config`; None if both accept it."""
    from fine_tune.validate import check_config

    try:
        cfg = compose(["logger=none", "trainer=cpu", "trainer.max_steps=2", *overrides])
    except Exception as error:  # Hydra's and OmegaConf's: the command prints their message alone
        return error
    try:
        check_config(cfg)
    except UserError as error:
        return error
    return None


@pytest.mark.parametrize(("overrides", "needle"), [c[1:] for c in IN_PROCESS], ids=[c[0] for c in IN_PROCESS])
def test_bad_configuration_is_refused_before_anything_loads(overrides, needle):
    error = refusal(overrides)
    assert error is not None, f"{overrides} accepted"
    assert needle in str(error), str(error)
    if isinstance(error, UserError):  # ours: one short paragraph naming the key
        assert len(str(error).splitlines()) <= 3, str(error)
        assert error.where, str(error)
    assert TOKEN not in str(error)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        ("fine_tune.generate", ["run=/nonexistent/run", "prompt=hi"], "run"),
        ("fine_tune.export", ["run=/nonexistent/run"], "run"),
        ("fine_tune.export", ["run=.", "shape=round"], "shape"),
        ("fine_tune.generate", ["run=.", "max_new_tokens=many"], "max_new_tokens"),
        ("fine_tune.export", ["run=.", "merge=perhaps"], "merge"),
        ("fine_tune.export", ["run=.", "merge=true", "base=halfway"], "base"),
    ],
    ids=[
        "generate_missing_run",
        "export_missing_run",
        "export_unknown_argument",
        "generate_bad_int",
        "export_bad_bool",
        "export_unknown_merge_base",
    ],
)
def test_bad_tool_arguments_fail_cleanly(module, args, needle):
    result = cli(args, module=module, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and needle in result.stderr
