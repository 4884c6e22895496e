"""Trackers: redaction, run identity (names, groups, flat config), W&B offline runs, TensorBoard."""

from __future__ import annotations

import logging

import pytest
from helpers import CONF
from omegaconf import OmegaConf

from fine_tune.tracking import base
from fine_tune.tracking.redact import MASK, is_secret_key, redact, redact_override, redact_text

FAKE_WANDB_KEY = "5f3c2a9e8d7b6a5f4e3d2c1b0a9f8e7d6c5b4a39"  # 40 hex, shaped like a W&B key
FAKE_HF = "hf_QwErTyUiOpAsDfGhJkLzXcVbNm123456"


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)


# --- redaction -------------------------------------------------------------------------------


def test_secret_keys_are_told_from_tokenizer_and_count_keys():
    for key in ("hf_token", "token", "wandb.api_key", "password", "aws_secret_access_key", "logger.apikey"):
        assert is_secret_key(key), key
    for key in (
        "pad_token",
        "eos_token",
        "max_new_tokens",
        "tokens_seen",
        "pad_token_id",
        "tokenizer",
        "author",
    ):
        assert not is_secret_key(key), key


def test_redact_masks_secret_keys_token_shapes_and_env_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "odd-shaped-value-123")
    data = {
        "hf_token": "anything",
        "note": f"key {FAKE_HF} and {FAKE_WANDB_KEY}",
        "nested": {"list": ["odd-shaped-value-123", 3], "revision": "0" * 40},
        "pad_token": "</s>",
        "lr": 1e-4,
    }
    out = redact(data)
    assert out["hf_token"] == MASK
    assert FAKE_HF not in out["note"] and FAKE_WANDB_KEY not in out["note"] and out["note"].startswith("key ")
    assert out["nested"]["list"] == [MASK, 3]
    assert out["nested"]["revision"] == "0" * 40  # a hub commit is not a key
    assert out["pad_token"] == "</s>" and out["lr"] == 1e-4
    assert data["hf_token"] == "anything"  # input untouched


def test_redact_override_and_text():
    assert redact_override(f"+hf_token={FAKE_HF}") == f"+hf_token={MASK}"
    assert redact_override(f"model.note={FAKE_HF}") == f"model.note={MASK}"
    assert redact_override("lora.r=16") == "lora.r=16"
    assert redact_text("Bearer abcdefghijklmnopqrstuvwxyz") == MASK
    assert redact_text("loss 1.23 at step 40") == "loss 1.23 at step 40"


# --- run identity ----------------------------------------------------------------------------


def test_run_name_uses_short_keys_and_keeps_colliding_keys_full():
    name = base.run_name(["lora.r=16", "lora.lora_alpha=32", "optim=paged_adamw_8bit", "hydra.verbose=true"])
    assert name == "r=16,alpha=32,optim=paged_adamw_8bit"
    assert base.run_name(["optim.lr=1e-4", "trainer.lr=2"]) == "optim.lr=1e-4,trainer.lr=2"
    assert base.run_name(["logger.project=x"], fallback="job3") == "job3"
    assert base.run_name([]) is None
    assert FAKE_HF not in base.run_name([f"+hf_token={FAKE_HF}", "lora.r=4"])


def test_run_config_is_flat_resolved_redacted_and_carries_overrides():
    cfg = OmegaConf.create(
        {
            "lora": {"r": 8, "lora_alpha": "${double:${lora.r}}", "target_modules": ["q_proj", "v_proj"]},
            "run_dir": "${hydra:runtime.output_dir}",  # cannot resolve outside Hydra: must not crash
            "secret_key": "s3cr3t-value",
            "hydra": {"mode": "MULTIRUN"},
        }
    )
    OmegaConf.register_new_resolver("double", lambda x: 2 * int(x), replace=True)
    flat = base.run_config(
        cfg, {"overrides": ["lora.r=8", f"+hf_token={FAKE_HF}"], "num": 2, "choices": {"optim": "a"}}
    )
    assert flat["lora.target_modules"] == ["q_proj", "v_proj"]
    assert flat["lora.r"] == 8
    assert flat["secret_key"] == MASK
    assert not any(k.startswith("hydra") for k in flat)
    assert flat["overrides"] == f"lora.r=8,+hf_token={MASK}"
    assert flat["hf_token"] == MASK and flat["job.num"] == 2 and flat["choices.optim"] == "a"
    assert FAKE_HF not in repr(flat)


def test_only_rank_zero_logs(monkeypatch):
    assert base.is_main_process()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not base.is_main_process()
    monkeypatch.setenv("RANK", "0")  # global rank wins over local rank
    assert base.is_main_process()


def test_sweep_group_is_the_sweep_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert base.sweep_group(tmp_path / "multirun" / "a" / "b") == "multirun/a/b"
    assert base.sweep_group(None) is None
    assert base.sweep_group("/elsewhere/x/y/z") == "x/y/z"


# --- W&B -------------------------------------------------------------------------------------


def test_mode_offline_without_key_online_with_netrc(tmp_path, monkeypatch):
    from fine_tune.tracking import wandb as wb

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    assert wb.resolve_mode(None)[0] == "offline"
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_WANDB_KEY}\n")
    netrc.chmod(0o600)
    assert wb.has_api_key() and wb.resolve_mode(None)[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # WANDB_MODE honoured over the key
    assert wb.resolve_mode(None) == ("offline", "WANDB_MODE")
    assert wb.resolve_mode("disabled")[0] == "disabled"  # an explicit logger.mode wins


def _two_jobs(tmp_path, tracker_factory):
    """Two jobs of one 'sweep' in one process, like Hydra's basic launcher runs them."""
    cfg = OmegaConf.create({"lora": {"r": 4, "lora_alpha": 8}, "optim": {"lr": 1e-3}})
    dirs = []
    for num, r in enumerate((4, 16)):
        cfg.lora.r = r
        run_dir = tmp_path / "sweep" / f"lora.r={r}"
        tracker = tracker_factory()
        try:
            tracker.start(
                cfg,
                run_dir,
                job={"overrides": [f"lora.r={r}"], "sweep_dir": str(tmp_path / "sweep"), "num": num},
            )
            for step in range(1, 4):
                tracker.log_metrics({"train/loss": 10.0 * r + step, "train/learning_rate": 1e-3}, step)
            tracker.log_metrics({"eval/loss": 5.0 * r, "eval/perplexity": 2.0}, 3)
            tracker.log_samples([{"prompt": "2+2?", "completion": "4"}], 3)
            tracker.summary({"eval_loss": 5.0 * r, "trainable_params": 123})
        finally:
            tracker.finish("finished" if num == 0 else "failed")
        dirs.append(run_dir)
    return dirs


def test_wandb_one_offline_run_per_job_grouped_named_with_own_history(tmp_path, monkeypatch, caplog):
    from fine_tune.tracking.wandb import WandbTracker
    from fine_tune.tracking.wandb_offline import find_runs, read_run

    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)  # present, but WANDB_MODE forces offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(WandbTracker, "_sync_hint_shown", False)
    caplog.set_level(logging.WARNING, logger="fine_tune.tracking.wandb")
    monkeypatch.chdir(tmp_path)  # the group is the sweep dir relative to the cwd
    dirs = _two_jobs(tmp_path, lambda: WandbTracker(project="p", tags=["t1"], console="off"))
    runs = [read_run(next(iter(find_runs(d)))) for d in dirs]
    assert [len(find_runs(d)) for d in dirs] == [1, 1]
    assert {r["group"] for r in runs} == {"sweep"}
    assert [r["name"] for r in runs] == ["r=4", "r=16"]
    assert [r["config"]["lora.r"] for r in runs] == [4, 16]
    assert runs[1]["config"]["overrides"] == "lora.r=16" and runs[1]["tags"] == ["t1"]
    for r, run in zip((4, 16), runs, strict=True):
        losses = [h["train/loss"] for h in run["history"] if "train/loss" in h]
        assert losses == [10.0 * r + 1, 10.0 * r + 2, 10.0 * r + 3]
        assert run["summary"]["eval_loss"] == 5.0 * r and run["summary"]["trainable_params"] == 123
    assert runs[0]["summary"]["status"] == "finished" and runs[1]["summary"]["status"] == "failed"
    assert runs[0]["exit_code"] == 0 and runs[1]["exit_code"] == 1
    hints = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(hints) == 1 and str(tmp_path / "sweep") in hints[0]
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert FAKE_WANDB_KEY.encode() not in file.read_bytes(), file


def test_wandb_logs_nothing_on_other_ranks_or_when_disabled(tmp_path, monkeypatch):
    from fine_tune.tracking.wandb import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("RANK", "1")
    _two_jobs(tmp_path / "rank1", WandbTracker)
    monkeypatch.delenv("RANK")
    _two_jobs(tmp_path / "disabled", lambda: WandbTracker(mode="disabled"))
    assert not list(tmp_path.rglob("*.wandb"))


def test_offline_reader_stops_at_a_torn_tail(tmp_path, monkeypatch):
    from fine_tune.tracking.wandb import WandbTracker
    from fine_tune.tracking.wandb_offline import find_runs, iter_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    (run_dir,) = _two_jobs(tmp_path, lambda: WandbTracker(console="off"))[:1]
    path = find_runs(run_dir)[0]
    whole = list(iter_records(path))
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(path.read_bytes()[:-5])
    assert 0 < len(list(iter_records(torn))) < len(whole)
    bogus = tmp_path / "bogus.wandb"
    bogus.write_bytes(b"not a wandb file at all")
    with pytest.raises(ValueError):
        list(iter_records(bogus))


# --- TensorBoard and none --------------------------------------------------------------------


def test_tensorboard_writes_scalars_samples_and_hparams_per_job(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fine_tune.tracking.tensorboard import TensorBoardTracker

    dirs = _two_jobs(tmp_path, TensorBoardTracker)
    for r, run_dir in zip((4, 16), dirs, strict=True):
        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        assert [e.value for e in acc.Scalars("train/loss")] == [10.0 * r + 1, 10.0 * r + 2, 10.0 * r + 3]
        assert acc.Scalars("final/eval_loss")[0].value == 5.0 * r
        assert "samples" in acc.Tags()["tensors"] or "samples/text_summary" in acc.Tags()["tensors"]


@pytest.mark.parametrize("option", ["wandb", "tensorboard", "none"])
def test_logger_yaml_instantiates_with_every_documented_option(option, tmp_path):
    """Each option of conf/logger must be an argument of its tracker (a typo would fail at run start)."""
    from hydra.utils import instantiate

    node = OmegaConf.load(CONF / "logger" / f"{option}.yaml")
    tracker = instantiate(node)
    assert isinstance(tracker, base.Tracker)
    text = (CONF / "logger" / f"{option}.yaml").read_text()
    for key in node:
        if key != "_target_":
            assert "# " in text.split(f"\n{key}:", 1)[1].splitlines()[0], f"{option}.{key} has no comment"
    tracker.finish("finished")  # finish before start is a no-op, as `finally` may call it
