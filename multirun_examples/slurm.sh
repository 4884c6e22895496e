#!/usr/bin/env bash
# Question: how do I run a grid on a SLURM cluster, one GPU per configuration, surviving
# preemption? conf/hydra/launcher/slurm.yaml submits one job per configuration (submitit); a
# preempted or timed-out job is requeued into the same job dir and, with resume=true, continues
# from its last checkpoint; finished jobs are skipped when you rerun this script.
# Run it on the login node; it waits for the jobs, then prints the summary and the comparison.
#
#   multirun_examples/slurm.sh hydra.launcher.partition=gpu hydra.launcher.account=myproj
#   multirun_examples/slurm.sh hydra.launcher.gpus_per_node=2 hydra.launcher.timeout_min=1440
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
