"""`python -m fine_tune` for the FSDP tests on CPU processes (gloo).

accelerate 1.15 runs FSDP only on accelerators: on CPU processes it quietly trains with DDP, which
fine_tune refuses at validation. This shim lifts exactly those two checks (accelerate's device
test, and the validation's "FSDP runs on GPUs only") so that everything else of a `trainer.strategy
=fsdp` run - SFTConfig's FSDP2 settings, accelerate's fully_shard by decoder layer, FSDP's
activation checkpointing, the adapter gathered from the shards, checkpoints, one run dir - runs
for real under `python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_cpu_shim.py ...`.
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

import fine_tune.validate

_init = AcceleratorState.__init__


def _init_allowing_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_allowing_cpu_fsdp
fine_tune.validate._LazyCuda.present = True  # the machine check only: devices stay the CPU's
sys.argv[0] = "fine_tune"
runpy.run_module("fine_tune", run_name="__main__", alter_sys=True)
