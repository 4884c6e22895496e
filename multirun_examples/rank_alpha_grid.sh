#!/usr/bin/env bash
# Question: how do LoRA rank and alpha trade off? 3 x 3 grid of lora.r x lora.lora_alpha, every
# job its own W&B run in one group (the sweep dir), then a comparison table + loss curves.
#
#   multirun_examples/rank_alpha_grid.sh                          # tiny Mistral on CPU, a few minutes
#   multirun_examples/rank_alpha_grid.sh model=mixtral quant=nf4 trainer=default hydra/launcher=slurm
#
# Extra arguments are Hydra overrides and win over the defaults below. Rerunning with the same
# SWEEP_DIR skips the jobs that finished and retries the others.
set -euo pipefail
SWEEP_DIR="${SWEEP_DIR:-multirun/examples/rank_alpha_grid}"

python -m fine_tune -m \
  lora.r=4,8,16 lora.lora_alpha=8,16,32 \
  trainer=cpu \
  hydra.sweep.dir="$SWEEP_DIR" \
  "$@"

python -m fine_tune.compare "$SWEEP_DIR"
