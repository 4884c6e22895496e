"""pytest's hooks and the shared fixtures; the helpers they use, and that tests import, are in
tests/helpers.py. Every derived artefact (converted tokenizer, tiny model weights, data cache) is
kept in one per-session directory."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import make_shared_runs_dir, mistral_tokenizer

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


@pytest.fixture(scope="session")
def tok():
    """Mistral's v1 tokenizer (mistral-common), as fine_tune loads it."""
    return mistral_tokenizer()


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
