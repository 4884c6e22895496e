#!/usr/bin/env bash
# Question: how do I run a grid on a SLURM cluster, one GPU (or several) per configuration,
# surviving preemption? conf/hydra/launcher/slurm.yaml submits one job per configuration
# (submitit); a preempted or timed-out job is requeued into the same job dir and, with resume=true,
# continues from its last checkpoint; finished jobs are skipped when you rerun this script.
# With gpus_per_node=N each job runs N tasks, one rank per GPU (DDP, or trainer=fsdp), in one job dir.
# Run it on the login node; it waits for the jobs, then prints the summary and the comparison.
#
#   multirun_examples/slurm.sh hydra.launcher.partition=gpu hydra.launcher.account=myproj
#   multirun_examples/slurm.sh hydra.launcher.gpus_per_node=2 trainer=ddp trainer.gradient_accumulation_steps=2
#   multirun_examples/slurm.sh hydra.launcher.gpus_per_node=2 trainer=fsdp quant.quant_experts=false
#
# A single run over the GPUs of one allocation needs no launcher plugin: inside `sbatch`/`salloc`,
#   FINE_TUNE_RUN_DIR=outputs/mixtral_fsdp torchrun --nproc_per_node "$SLURM_GPUS_ON_NODE" -m fine_tune trainer=fsdp ...
# or `srun --ntasks-per-node=<GPUs> python -m fine_tune ...` (ranks from SLURM's variables; set
# FINE_TUNE_RUN_DIR: srun has no store through which the ranks agree on a timestamped directory).
set -euo pipefail
SWEEP_DIR="${SWEEP_DIR:-multirun/examples/slurm_mixtral}"

python -m fine_tune -m \
  hydra/launcher=slurm \
  model=mixtral quant=nf4 \
  lora.r=8,16,32 \
  resume=true \
  hydra.sweep.dir="$SWEEP_DIR" \
  "$@"

python -m fine_tune.compare "$SWEEP_DIR"
