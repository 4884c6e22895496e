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

And what every rank must agree on before and during the run: one run directory (`share_run_dir`),
SLURM's tasks as torch ranks (`adopt_slurm_tasks`), a stop requested on any rank (`max_over_ranks`), an
adapter that FSDP spread over the ranks (`sharded_trainable_state`), and the effective batch.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from fine_tune.hardware import is_main_process, launched, local_rank, rank, world_size

log = logging.getLogger("fine_tune")

# Teardown and interpreter exit take seconds; a process alive this long after its job is hung.
EXIT_GRACE_S = 120.0
# How long a rank waits for rank 0 to name the run directory (rank 0 composes the config meanwhile).
AGREE_TIMEOUT_S = 300.0


def effective_batch(trainer: Mapping[str, Any]) -> tuple[int, str]:
    """Examples per optimizer step over all processes, and how that number is made; validate, the
    run's first lines and metrics.json all report it from here."""
    batch, steps, world = (
        int(trainer["per_device_train_batch_size"]),
        int(trainer["gradient_accumulation_steps"]),
        world_size(),
    )
    how = f"{batch} per device x {steps} accumulation x {world} process{'es' if world > 1 else ''}"
    return batch * steps * world, how


def adopt_slurm_tasks() -> None:
    """srun (and Hydra's submitit launcher, which runs one task per GPU) announce each process in
    SLURM's variables only, while torch's `env://` rendezvous, accelerate and transformers read
    torchrun's: set those from SLURM's once, before anything distributed starts. Rank 0's node
    hosts the rendezvous, on a port derived from the job id (as submitit does)."""
    env = os.environ
    if env.get("RANK", "").isdigit() or not env.get("SLURM_PROCID", "").isdigit() or world_size() < 2:
        return
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    env.setdefault("MASTER_ADDR", _first_slurm_node() if nodes > 1 else "127.0.0.1")
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 40000))
    env.update(
        RANK=str(rank()),
        LOCAL_RANK=str(local_rank()),
        WORLD_SIZE=str(world_size()),
        LOCAL_WORLD_SIZE=str(world_size() // nodes),
    )


def _first_slurm_node() -> str:
    from fine_tune.errors import UserError

    try:
        from submitit.slurm.slurm import SlurmJobEnvironment
    except ImportError:
        raise UserError(
            "a multi-node SLURM job needs the first node's address for the rendezvous",
            where="MASTER_ADDR",
            hint="pip install 'fine_tune[sweeps]' (submitit reads SLURM's node list), or export MASTER_ADDR",
        ) from None
    return SlurmJobEnvironment().hostnames[0]


def share_run_dir(run_dir: str) -> str:
    """Rank 0's run (or sweep) directory, on every rank of a torchrun / `accelerate launch` job.

    Each rank composes the config itself, so `${now:}` in `hydra.run.dir` would give each its own
    directory (hydra#2070). torchrun's agent hosts a key-value store for the job's rendezvous
    (TORCHELASTIC_USE_AGENT_STORE): rank 0 writes the directory it resolved there and the other
    ranks read it, before Hydra creates anything. Without that store (srun tasks) `run_dir` is
    returned as it is: set FINE_TUNE_RUN_DIR, or use a sweep (its directory is resolved once).
    """
    env = os.environ
    if world_size() < 2 or not launched():
        return run_dir
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not env.get("MASTER_PORT", "").isdigit():
        if "FINE_TUNE_RUN_DIR" not in env and is_main_process():
            log.warning(
                "%d processes and no torchrun store: set FINE_TUNE_RUN_DIR to share a run dir", world_size()
            )
        return run_dir
    from torch.distributed import TCPStore

    store = TCPStore(
        env.get("MASTER_ADDR", "127.0.0.1"),
        int(env["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=AGREE_TIMEOUT_S),
    )
    key = f"fine_tune/run_dir/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # a restarted job agrees anew
    if rank() == 0:
        store.set(key, run_dir)
    return store.get(key).decode()


def max_over_ranks(value: int) -> int:
    """The largest `value` of all ranks, on every rank (`value` itself in a single process). A stop
    (a signal that reached one process first) must be taken at the same step by all, or the others
    wait forever in the next collective."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return value
    dist = torch.distributed
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def is_sharded(model: Any) -> bool:
    """True for a model FSDP sharded: every forward (a generated token too) gathers weights from
    every rank, so all ranks must run the same number of them."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sharded_trainable_state(model: Any) -> dict | None:
    """The trainable weights of a model FSDP sharded, gathered whole: every rank must call this (each
    holds a shard), rank 0 gets the tensors on the CPU, the others an empty dict. None when the
    model is not sharded (save it as usual). The frozen base stays where it is: gathering it would
    put the whole model in rank 0's memory for an adapter of a few megabytes."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


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
