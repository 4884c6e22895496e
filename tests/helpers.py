"""The test helpers, one module (imported explicitly; tests/conftest.py holds pytest's hooks and the
fixtures made from these): paths, the real config composed, the command line and the tools, tiny
model configs, tokenizers and mistral-common's reference ids, and the tiny runs a session shares.

The tokenizer is Mistral's real v1 tokenizer from mistral-common, so the data tests exercise the ids
the models see, without the hub. One tiny trained run is shared by the lifecycle tests of a session
(training it is the slow part): trained once, on first use, by `tiny_run()`, with settings every
test can reproduce (`TINY`).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = Path(__file__).parent / "fixtures" / "data"
# The workspace's public data, next to the repository (FINE_TUNE_SHARED_DATA for a checkout elsewhere).
SHARED_DATA = Path(os.environ.get("FINE_TUNE_SHARED_DATA", ROOT / ".." / "shared" / "data"))


# ------------------------------------------------------------------------------------------------
# Configs

# Small and fast settings for end-to-end runs of the tiny models on CPU: the one base every test's
# overrides start from.
FAST = [
    "trainer=cpu",
    "logger=none",
    "trainer.max_steps=12",
    "trainer.eval_steps=6",
    "trainer.save_steps=6",
    "dataset.max_samples=96",
    "dataset.max_eval_samples=16",
]


def with_overrides(base: list[str], *changes: str) -> list[str]:
    """`base` with `changes` applied, one entry per key (a key given again replaces its value)."""
    keys = {change.split("=", 1)[0] for change in changes}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(changes)


# 8 steps, a loss logged every step, checkpoints at 3 and 6 (+ the preemption one), evals at 4 and 8.
TINY = with_overrides(
    FAST,
    "trainer.max_steps=8",
    "trainer.per_device_train_batch_size=2",
    "dataset.max_length=128",
    "trainer.logging_steps=1",
    "trainer.eval_steps=4",
    "trainer.save_steps=3",
    "trainer.save_total_limit=2",
    "dataset.max_samples=32",
    "dataset.max_eval_samples=4",
)


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """The real config, composed exactly as `python -m fine_tune OVERRIDES` would (without a job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides or [], return_hydra_config=return_hydra_config)


def checked(overrides: list[str] | None = None):
    """`compose(overrides)` typed and completed by the schema, as every run and mode does first."""
    from fine_tune.schema import check_types

    cfg = compose(overrides)
    check_types(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------
# The command line and the tools


def child_env(extra: dict | None = None) -> dict:
    """The environment of the interpreters the tests start: offline, `extra` on top."""
    base = {
        **os.environ,
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return {**base, **(extra or {})}


def cli(
    args: list[str],
    module: str = "fine_tune",
    env: dict | None = None,
    timeout: int = 600,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """`python -m <module> ARGS` in a subprocess, as a user would type it (the one CLI runner);
    `env`: variables on top of `child_env()`."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def popen(args: list[str], module: str = "fine_tune") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_tool(module: str, args: list[str], stdin: str = "") -> str:
    """What `python -m MODULE ARGS` prints (fine_tune.generate, fine_tune.export), run through the
    tool's own `main` in this process, `stdin` as its input. For tests of what a tool computes or
    writes; how the command line reports errors (exit 2, no traceback) is tested through `cli`."""
    import contextlib
    import importlib
    import io

    out, before = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            importlib.import_module(module).main(args)
    finally:
        sys.stdin = before
    return out.getvalue()


# ------------------------------------------------------------------------------------------------
# Tiny models


# The tiny Mistral and Mixtral's shape: 2 layers, 64 wide, 4 heads of 16 (2 KV heads), MLP 128.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_SHAPE.update(num_key_value_heads=2, vocab_size=256, use_cache=False)


def tiny_mistral_config(**overrides):
    """A 2-layer Mistral (`TINY_SHAPE`) for CPU tests of attention, packing and the engine; `overrides`:
    other sizes or any other config key."""
    from transformers import MistralConfig

    return MistralConfig(**{**TINY_SHAPE, **overrides})


def tiny_mixtral_config(**overrides):
    """The tiny Mistral's shape with 4 experts, top-2: small enough for CPU tests of the MoE code."""
    from transformers import MixtralConfig

    return MixtralConfig(**{**TINY_SHAPE, "num_local_experts": 4, "num_experts_per_tok": 2, **overrides})


# Qwen2-MoE's MoE layers on the tiny shape: 4 experts of 32 (top-2) and a shared expert of 48.
TINY_QWEN2_MOE = dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48)
TINY_QWEN2_MOE.update(num_experts=4, num_experts_per_tok=2, vocab_size=128)


def tiny_qwen2_moe_config(**overrides):
    """Qwen2-MoE's own layout: a shared expert, q/k/v biases, experts saved as mlp.experts.{e}.*_proj."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**{**TINY_SHAPE, **TINY_QWEN2_MOE, **overrides})


# ------------------------------------------------------------------------------------------------
# Tokenizers (the `tok` fixture is `mistral_tokenizer()`) and mistral-common's reference ids


@functools.cache
def mistral_tokenizer(version: str = "v1"):
    """Mistral's tokenizer `version` (v1; v3: a 32768 vocabulary with [INST]/[/INST] as control
    tokens; v7) from mistral-common, as fine_tune loads it; one per session."""
    from fine_tune.models.tokenizer import mistral_common_tokenizer

    return mistral_common_tokenizer(f"mistral_{version}")


def saved_copy(tokenizer, path: Path):
    """The tokenizer after save_pretrained/from_pretrained: tokenizer.json only, no .model file."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


@functools.cache
def mistral_common(version: str, finetuning: bool = False):
    """mistral-common's tokenizer `version` (v1/v3/v7); `finetuning` accepts conversations that end
    with the assistant (the default validator wants a final user turn, a prompt)."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    base = getattr(MistralTokenizer, version)()
    if not finetuning:
        return base
    return MistralTokenizer(
        base.instruct_tokenizer,
        validator=type(base._chat_completion_request_validator)(ValidationMode.finetuning),
        request_normalizer=base._instruct_request_normalizer,
    )


def reference(version: str, conversation, final_user: str | None = None) -> list[int]:
    """Ids from mistral-common for (role, content) turns; a training conversation (ending with the
    assistant) in fine-tuning mode, or a prompt when `final_user` is given."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    messages = [kinds[role](content=content) for role, content in conversation]
    if final_user is not None:
        messages.append(UserMessage(content=final_user))
    tokenizer = mistral_common(version, finetuning=final_user is None)
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


# ------------------------------------------------------------------------------------------------
# Runs: trained here or shared by the session, and what they leave


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(run_dir: Path) -> list[tuple[int, float, float | None]]:
    """(step, train loss, grad norm) of every logged step: what exact resume must reproduce."""
    return [
        (r["step"], r["train/loss"], r.get("train/grad_norm"))
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if "train/loss" in r
    ]


def status(run_dir: Path) -> str | None:
    path = run_dir / "status.json"
    return json.loads(path.read_text()).get("status") if path.is_file() else None


# Where the session's shared runs live: made by the first pytest process (the xdist controller, or
# the only process with -n 0) and inherited by the workers it starts, so that a run several test
# files read (the tiny run: five of them) is trained once per session, not once per worker.
SHARED_RUNS = "FINE_TUNE_TEST_SHARED_RUNS"


def make_shared_runs_dir() -> None:
    """Create the session's shared-runs directory (once, in the first process), removed at exit."""
    if SHARED_RUNS in os.environ:
        return
    path = tempfile.mkdtemp(prefix="ft-lifecycle-")
    os.environ[SHARED_RUNS] = path
    atexit.register(shutil.rmtree, path, True)


def _session_dir() -> Path:
    make_shared_runs_dir()
    return Path(os.environ[SHARED_RUNS])


@functools.cache
def trained_run(name: str, args: tuple[str, ...]) -> Path:
    """An uninterrupted run of `args`, trained on first use and shared by the session's tests (across
    xdist workers: the first to ask trains it under a lock, the others wait and read it)."""
    from filelock import FileLock

    run_dir = _session_dir() / name
    with FileLock(str(run_dir) + ".lock"):
        if status(run_dir) != "finished":  # not trained yet, or a failed attempt's leftovers
            shutil.rmtree(run_dir, ignore_errors=True)
            result = cli([*args, f"hydra.run.dir={run_dir}"])
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir


def tiny_run() -> Path:
    """The shared uninterrupted tiny run."""
    return trained_run("tiny", tuple(TINY))


# Keys of metrics.jsonl that measure the machine (speed, memory, and every perf/*_seconds wall-clock
# time), not the training: they differ between any two runs, resumed or not.
MEASURED = ("perf/tokens_per_second", "perf/mfu", "perf/peak_memory_gib")


def measured(key: str) -> bool:
    return key in MEASURED or (key.startswith("perf/") and key.endswith("_seconds"))


def logged(run_dir: Path) -> list[dict]:
    """Every metrics.jsonl row without the measured keys: what a resumed run must reproduce exactly."""
    return [
        {k: v for k, v in row.items() if not measured(k)} for row in read_jsonl(run_dir / "metrics.jsonl")
    ]


def stopped_copy(run_dir: Path, dest: Path, last_checkpoint: int | None = None) -> Path:
    """A copy of a finished run as a job stopped after checkpoint `last_checkpoint` would leave it
    (default: the newest): later checkpoints, the adapter, the tokenizer and metrics.json gone,
    status `preempted`. Its logs still run past the checkpoint, as a killed job's do."""
    shutil.copytree(run_dir, dest)
    for name in ("adapter", "tokenizer", "metrics.json"):
        path = dest / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if last_checkpoint is not None:
        for path in (dest / "checkpoints").iterdir():
            if int(path.name.split("-")[1]) > last_checkpoint:
                shutil.rmtree(path)
    state = json.loads((dest / "status.json").read_text())
    (dest / "status.json").write_text(json.dumps({**state, "status": "preempted", "ended": None}))
    return dest


def train_here(run_dir: Path, overrides: list[str]) -> tuple[Any, dict, Any]:
    """`python -m fine_tune OVERRIDES hydra.run.dir=RUN_DIR`, trained in this process: for tests of what
    a run leaves behind (generate and export read it), which a subprocess would only make seconds of
    imports slower. The composed config is saved where Hydra saves it, before the job, then
    `fine_tune.run.train` runs. Returns (cfg, final metrics, trainer)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fine_tune.run import train

    cfg = compose(list(overrides))
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), run_dir / ".hydra" / "overrides.yaml")
    metrics, trainer = train(cfg, run_dir, instantiate(cfg.logger), job={"overrides": list(overrides)})
    return cfg, metrics, trainer
