#!/usr/bin/env bash
# Question: how do I run a sweep's jobs side by side on one machine? The joblib launcher preset
# (conf/hydra/launcher/local_parallel.yaml) runs N jobs at once in separate processes.
# On CPU, split the cores between the jobs (OMP_NUM_THREADS below). On a multi-GPU machine give
# each job its own GPU: run one sweep per GPU, e.g.
#   CUDA_VISIBLE_DEVICES=0 SWEEP_DIR=multirun/p ./parallel_local.sh lora.r=8,16 hydra.launcher.n_jobs=1 &
#   CUDA_VISIBLE_DEVICES=1 SWEEP_DIR=multirun/p ./parallel_local.sh lora.r=32,64 hydra.launcher.n_jobs=1 &
# (the same SWEEP_DIR keeps them in one W&B group and one compare table).
#
#   multirun_examples/parallel_local.sh                           # 2 jobs at a time, tiny model, CPU
set -euo pipefail
SWEEP_DIR="${SWEEP_DIR:-multirun/examples/parallel_local}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

python -m fine_tune -m \
  hydra/launcher=local_parallel hydra.launcher.n_jobs=2 \
  lora.r=4,8,16,32 \
  trainer=cpu \
  hydra.sweep.dir="$SWEEP_DIR" \
  "$@"

python -m fine_tune.compare "$SWEEP_DIR"
