"""How a run under torchrun / accelerate launch / srun ends: every rank leaves together, or not at all.

The end of a multi-process run is the one asymmetric phase: rank 0 saves the adapter, tokenizer,
metrics.json and status.json while the other ranks have nothing left to do. Before this module the
other ranks went straight on to `destroy_process_group()` and exited while rank 0 was still saving,
and every rank printed the final summary. Tearing a process group down while a peer is still using
it is the pattern behind intermittent end-of-run hangs (pytorch/pytorch#75097; torchtitan destroys
only after a clean finish, #1342). Here:

- `quiet_other_ranks`: only rank 0 logs progress and the summary; other ranks still warn.
- `end_process_group(finished)`: after a clean finish all ranks meet at a barrier (rank 0 is done
  saving) and destroy the group together. After a failure nothing collective is attempted: a peer
  may be inside a collective that will never complete, and torchrun stops the other ranks anyway.
- `exit_watchdog`: once a multi-process job is done, a process still alive `EXIT_GRACE_S` later
  prints every thread's stack and exits 1, so a hang at teardown costs minutes and leaves a trace
  instead of holding a cluster allocation until someone kills it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys

from fine_tune.hardware import is_main_process

# Teardown and interpreter exit take seconds; a process alive this long after its job is hung.
EXIT_GRACE_S = 120.0


def world_size() -> int:
    """Processes in the job as the launcher announced them (1 when not launched by one)."""
    value = os.environ.get("WORLD_SIZE", "")
    return int(value) if value.isdigit() else 1


def quiet_other_ranks() -> None:
    """Ranks other than 0 log warnings and errors only: one progress log, one final summary."""
    if not is_main_process():
        logging.getLogger("fine_tune").setLevel(logging.WARNING)


def end_process_group(finished: bool) -> None:
    """Leave the process group the Trainer opened (see the module docstring for why the barrier)."""
    torch = sys.modules.get("torch")  # never imported here just to find out there is nothing to do
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if not finished:
        return
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
    dist.destroy_process_group()


def exit_watchdog(grace_s: float = EXIT_GRACE_S) -> None:
    """In a multi-process job, turn a process that does not exit within `grace_s` into stack traces
    on stderr and exit status 1. Python's faulthandler runs it from a C thread, so it fires even
    when the main thread is stuck inside a C++ destructor holding the GIL."""
    if world_size() > 1:
        faulthandler.dump_traceback_later(grace_s, exit=True)
