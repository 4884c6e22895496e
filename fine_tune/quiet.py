"""Keep the libraries' chatter out of the user's terminal: one place for every entrypoint.

A clean run should print what the user needs (the run directory, the data report, one line per
logging step, the result) and nothing they cannot act on. Each entry below is a message that a
correct run of fine_tune triggers inside a library:

- progress bars of datasets / transformers / the hub: they drown the training log (a terminal gets
  fine_tune's own bar, `fine_tune.training.progress`);
- FutureWarnings raised inside the libraries about their own internals (PEFT 0.21 calls
  transformers' deprecated `is_gradient_checkpointing`): nothing a user can change;
- bitsandbytes 0.50 logs, when it is imported on a CPU with AVX512-BF16, that it could not load an
  optional kernel from the `kernels` package; the CPU code it falls back to is the one it uses
  everywhere else;
- the hub client's HTTP library logs every request at INFO (Hydra shows INFO), and accelerate's
  FSDP helpers every checkpoint file they write;
- transformers advises FSDP's own activation checkpointing on every FSDP run; fine_tune uses the
  Trainer's on purpose (training/arguments.py: with FSDP's, PEFT saves empty adapters).

Must run before those libraries are imported (logging filters are attached to named loggers, which
exist before their modules do); importing this module imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LIBRARIES = r"(transformers|peft|accelerate|bitsandbytes|datasets|huggingface_hub|torch)(\.|$)"

# (logger, start of the message) of log records that are dropped.
DROPPED_LOG_LINES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels"),
    ("transformers.training_args", "When using FSDP, prefer `fsdp_config['activation_checkpointing']`"),
)
# Loggers that speak at INFO about every request or file: the hub client's HTTP libraries, accelerate's FSDP.
WARNINGS_ONLY = ("httpx", "httpx2", "httpcore", "accelerate.utils.fsdp_utils")


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_libraries() -> None:
    """Idempotent; call it first thing in every entrypoint."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    warnings.filterwarnings("ignore", category=FutureWarning, module=LIBRARIES)
    for name in WARNINGS_ONLY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, prefix in DROPPED_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessages(prefix))
    if "transformers" in sys.modules:  # imported already: the environment variables came too late
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_warning()
