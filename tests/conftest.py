"""Shared fixtures: compose the real config from conf/, run the CLI as a subprocess, and keep every
derived artefact (converted tokenizer, tiny model weights, data cache) in one per-session directory."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from lifecycle_helpers import (
    FAST,  # noqa: F401  the base overrides, re-exported for the tests that import them from here
    make_shared_runs_dir,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# glibc hands every block above its mmap threshold (at most 32 MiB by default) back to the kernel on
# free: the tiny models' logits (batch x length x 32,000 vocabulary, ~260 MB a step) were mapped,
# page-faulted in and unmapped again at every step, and the kernel's page zeroing took more CPU than
# the training (CPU runs of the default job: 1m21 s system time, 64 s user). Keeping large blocks in
# the heap makes the same runs 2.5x faster with the same numbers and ~50 MB more resident memory.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def tune_malloc() -> None:
    """Export MALLOC_TUNABLES for the processes started from here on: the xdist workers (started after
    pytest_configure) and every CLI run. glibc reads them at process start, so this process keeps
    its own; `-n 0` runs its in-process trainings at the old speed."""
    if sys.platform != "linux" or "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))


def pytest_configure(config: pytest.Config) -> None:
    tune_malloc()
    make_shared_runs_dir()  # before the workers start: they inherit its path
    cache = Path(config.rootpath) / ".cache" / "test-session"
    os.environ.setdefault("FINE_TUNE_CACHE", str(cache))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # pytest -n: each worker, and the CLI runs it starts, gets its share of the cores
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:  # noqa: ARG001
    """The test files with the most `subprocess` tests first, the others after, each in its order.

    xdist hands out whole files (`--dist loadfile`) in collection order (`--no-loadscope-reorder`
    in pyproject): a long file handed out last runs alone while the other worker idles. The files
    that start interpreters are the long ones (seconds of imports per CLI run), so they go first."""
    weight = Counter(item.nodeid.split("::")[0] for item in items if item.get_closest_marker("subprocess"))
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])  # stable: files stay whole


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """The real config, composed exactly as `python -m fine_tune` would (without running a job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides or [], return_hydra_config=return_hydra_config)


def run_cli(
    args: list[str],
    cwd: Path | None = None,
    env: dict | None = None,
    timeout: int = 600,
    module: str = "fine_tune",
) -> subprocess.CompletedProcess:
    """`python -m fine_tune ARGS` in a subprocess (lifecycle_helpers.cli, with conftest's argument names)."""
    from lifecycle_helpers import cli

    return cli(args, module=module, extra_env=env, timeout=timeout, cwd=cwd)


def tiny_mixtral_config(**overrides):
    """A 2-layer, 4-expert, top-2 Mixtral small enough for CPU tests of the MoE code."""
    from transformers import MixtralConfig

    args = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        use_cache=False,
    )
    return MixtralConfig(**{**args, **overrides})


def tiny_qwen2_moe_config(**overrides):
    """Qwen2-MoE's own layout: a shared expert, q/k/v biases, experts saved as mlp.experts.{e}.*_proj."""
    from transformers import Qwen2MoeConfig

    args = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32)
    args.update(shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    args.update(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, use_cache=False)
    return Qwen2MoeConfig(**{**args, **overrides})


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001 - pytest's hook
    """Which CPU kind the suite ran on (printed even with -q): bitsandbytes' 4-bit CPU path differs
    with AVX512-BF16 (README, "CPUs: what changes numerics"), so a log should say which one passed."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line), "?")
    flags = set(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )
    features = ", ".join(
        f"{f}={'yes' if f in flags else 'no'}" for f in ("avx512f", "avx512_bf16", "amx_bf16")
    )
    terminalreporter.write_line(f"CPU: {model} ({os.cpu_count()} cores; {features})")
